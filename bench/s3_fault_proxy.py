#!/usr/bin/env python3
"""A fault-injecting HTTP proxy in front of an S3 API server (moto's, in tests and benchmarks), on 127.0.0.1.

Every S3 request passes through; at a configurable rate one of four faults replaces the normal answer:

- ``500``: HTTP 500 ``InternalError`` (S3's XML error body);
- ``503``: HTTP 503 ``SlowDown`` (S3's throttling answer);
- ``reset``: the request is read, then the connection is reset (TCP RST, no answer);
- ``delay``: the answer is held back ``delay_s`` seconds, then given normally.

Which requests may fault: ``match``, a regular expression searched in ``"METHOD /bucket/key?query"`` (empty: all).
``always``, a second such expression, names requests that fail every time (500, 503 or reset: a fault that outlasts
any retry policy, e.g. one object's GETs), whatever the rate; ``once``, a third, names requests whose first try fails (500, 503 or
reset) and whose retry passes: every matching object meets a fault its retries must absorb (the failed requests are
listed in the stats under ``once``). Choices are drawn from a seeded generator, so a run's faults are the same
for the same sequence of requests.

Control, on the proxy's own port (never faulted): ``GET /__proxy__/stats`` -> JSON counts (requests, faults by kind,
faulted requests by method, the ``once`` faults by request); ``POST /__proxy__/config?rate=0.05&kinds=500,503&match=...&always=...&once=...&delay_s=1&seed=0`` changes
the settings (and zeroes the counts); ``POST /__proxy__/reset`` zeroes the counts.

    python bench/s3_fault_proxy.py --upstream http://127.0.0.1:5000 [--port 0] [--rate 0.05]
        [--kinds 500,503,reset,delay] [--match REGEX] [--always REGEX] [--once REGEX] [--delay-s 1.0] [--seed 0] [--port-file FILE]

Prints ``listening on http://127.0.0.1:PORT`` (and writes PORT to ``--port-file``) once it accepts connections.
Stdlib only; stopped by its pid (SIGTERM).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KINDS = ("500", "503", "reset", "delay")
CONTROL = "/__proxy__/"
# Headers that belong to one hop, not to the request: the proxy sends its own.
HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
}
ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "SlowDown", "Please reduce your request rate."),
}


class Faults:
    """The proxy's settings and counts, shared by its handler threads."""

    def __init__(self, **settings):
        self.lock = threading.Lock()
        self.configure(**settings)

    def configure(
        self,
        rate: float,
        kinds: list[str],
        match: str,
        always: str,
        delay_s: float,
        seed: int,
        once: str = "",
    ) -> None:
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            raise ValueError(f"fault kinds must be among {KINDS}, got {kinds}")
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {rate}")
        with self.lock:
            self.rate, self.kinds, self.delay_s = rate, list(kinds), delay_s
            self.match = re.compile(match) if match else None
            self.always = re.compile(always) if always else None
            self.once = re.compile(once) if once else None
            self.rng = random.Random(seed)
            self.settings = {"rate": rate, "kinds": list(kinds), "match": match, "always": always, "once": once,
                             "delay_s": delay_s, "seed": seed}  # fmt: skip
            self.failed_once: dict[str, str] = {}  # request -> the fault its first try met
            self.requests = 0
            self.faults = {k: 0 for k in KINDS}
            self.faulted_methods: dict[str, int] = {}

    def draw(self, method: str, target: str) -> str | None:
        """The fault for this request, or None (counts it either way)."""
        with self.lock:
            self.requests += 1
            request = f"{method} {target}"
            failing = [k for k in self.kinds if k != "delay"] or ["503"]  # a late answer is not a failure
            if self.once is not None and self.once.search(request) and request not in self.failed_once:
                kind = self.rng.choice(failing)
                self.failed_once[request] = kind
            elif self.always is not None and self.always.search(request):
                kind = self.rng.choice(failing)
            elif self.match is not None and not self.match.search(request):
                return None
            elif self.rate <= 0 or self.rng.random() >= self.rate:
                return None
            else:
                kind = self.rng.choice(self.kinds)
            self.faults[kind] += 1
            self.faulted_methods[method] = self.faulted_methods.get(method, 0) + 1
            return kind

    def stats(self) -> dict:
        with self.lock:
            return {
                "settings": dict(self.settings),
                "requests": self.requests,
                "faults": dict(self.faults),
                "faulted": sum(self.faults.values()),
                "faulted_methods": dict(self.faulted_methods),
                "once": dict(self.failed_once),
            }


def make_handler(upstream: str, faults: Faults):
    parsed = urllib.parse.urlsplit(upstream)
    host, port = parsed.hostname, parsed.port or 80

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

        def log_message(self, *args) -> None:  # quiet: counts are in /__proxy__/stats
            pass

        def _body(self) -> bytes:
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                parts = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return b"".join(parts)
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _reply(self, status: int, body: bytes, headers: list[tuple[str, str]] = ()) -> None:
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            if not any(k.lower() == "content-length" for k, _ in headers):
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _control(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            q = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()}
            try:
                if url.path == CONTROL + "config" and self.command == "POST":
                    s = faults.settings
                    faults.configure(
                        rate=float(q.get("rate", s["rate"])),
                        kinds=[k for k in q.get("kinds", ",".join(s["kinds"])).split(",") if k],
                        match=q.get("match", s["match"]),
                        always=q.get("always", s["always"]),
                        once=q.get("once", s["once"]),
                        delay_s=float(q.get("delay_s", s["delay_s"])),
                        seed=int(q.get("seed", s["seed"])),
                    )
                elif url.path == CONTROL + "reset" and self.command == "POST":
                    faults.configure(**faults.settings)
                elif url.path != CONTROL + "stats":
                    raise ValueError(f"unknown control path {url.path}")
            except (ValueError, re.error) as e:
                self._reply(400, str(e).encode(), [("Content-Type", "text/plain")])
                return
            self._reply(200, json.dumps(faults.stats()).encode(), [("Content-Type", "application/json")])

        def _forward(self) -> None:
            if self.path.startswith(CONTROL):
                self._body()
                self._control()
                return
            body = self._body()
            kind = faults.draw(self.command, self.path)
            if kind == "reset":
                # SO_LINGER 0: close() sends RST instead of FIN, as a dropped connection does.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()
                return
            if kind in ERRORS:
                status, code, message = ERRORS[kind]
                xml = (
                    f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                    f"<Resource>{self.path}</Resource><RequestId>fault-proxy</RequestId></Error>"
                ).encode()
                self._reply(status, xml, [("Content-Type", "application/xml")])
                return
            if kind == "delay":
                time.sleep(faults.delay_s)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
            headers["Content-Length"] = str(len(body))
            conn = http.client.HTTPConnection(host, port, timeout=120)
            try:
                conn.request(self.command, self.path, body=body if body or self.command in ("PUT", "POST") else None,
                             headers=headers)  # fmt: skip
                resp = conn.getresponse()
                data = resp.read()
                out = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP]
                if self.command != "HEAD":
                    out = [(k, v) for k, v in out if k.lower() != "content-length"]
                self._reply(resp.status, data, out)
            finally:
                conn.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    return Handler


class ProxyProcess:
    """The proxy as a child process (its own session), for tests and benchmarks: ``start``, ``configure``, ``stats``,
    ``stop`` (by its pid: SIGTERM, then SIGKILL)."""

    def __init__(self, upstream: str, **settings):
        self.upstream = upstream
        port_file = tempfile.mktemp(prefix="s3-fault-proxy-", suffix=".port")
        args = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), f"--upstream={upstream}", f"--port-file={port_file}", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        deadline = time.time() + 30
        while not os.path.exists(port_file):
            if self.proc.poll() is not None or time.time() > deadline:
                err = self.proc.stderr.read().decode() if self.proc.poll() is not None else "timed out"
                self.stop()
                raise RuntimeError(f"fault proxy did not start: {err[-2000:]}")
            time.sleep(0.05)
        with open(port_file) as f:
            self.port = int(f.read())
        os.unlink(port_file)
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def _call(self, method: str, path: str) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, CONTROL + path)
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise ValueError(body.decode())
            return json.loads(body)
        finally:
            conn.close()

    def configure(self, **settings) -> dict:
        """Change the settings (rate, kinds as a list or comma string, match, always, once, delay_s, seed) and zero the
        counts; unnamed settings keep their values."""
        if isinstance(settings.get("kinds"), (list, tuple)):
            settings["kinds"] = ",".join(settings["kinds"])
        return self._call("POST", "config?" + urllib.parse.urlencode(settings))

    def stats(self) -> dict:
        return self._call("GET", "stats")

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> ProxyProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True, help="the S3 server's endpoint, http://127.0.0.1:PORT")
    ap.add_argument("--port", type=int, default=0, help="0: any free port")
    ap.add_argument("--rate", type=float, default=0.0, help="share of matching requests that fault, 0..1")
    ap.add_argument("--kinds", default=",".join(KINDS), help="fault kinds drawn from, comma-separated")
    ap.add_argument("--match", default="", help="regex on 'METHOD /bucket/key?query'; empty: every request")
    ap.add_argument("--always", default="", help="regex of requests that fault every time, whatever the rate")
    ap.add_argument(
        "--once", default="", help="regex of requests whose first try fails and whose retry passes"
    )
    ap.add_argument("--delay-s", type=float, default=1.0, help="how long a 'delay' fault holds the answer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port-file", default="", help="write the port here once listening")
    a = ap.parse_args(argv)
    faults = Faults(rate=a.rate, kinds=[k for k in a.kinds.split(",") if k], match=a.match, always=a.always,
                    once=a.once, delay_s=a.delay_s, seed=a.seed)  # fmt: skip
    server = ThreadingHTTPServer(("127.0.0.1", a.port), make_handler(a.upstream, faults))
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    port = server.server_address[1]
    if a.port_file:
        with open(a.port_file + ".tmp", "w") as f:
            f.write(str(port))
        os.replace(a.port_file + ".tmp", a.port_file)
    print(f"listening on http://127.0.0.1:{port}", flush=True)
    server.serve_forever()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
