"""The data path's pure parts: what an input names, first-row-wins de-duplication with the resume anti-join, one
row per image, the output lease, per-query limits."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rea2seg_ray.config import LimitsConfig, SegmentConfig, load_config
from rea2seg_ray.datasets import DatasetError, read_queries, resolve_input
from rea2seg_ray.images import DecodeError, decode
from rea2seg_ray.pipeline import lease as leases
from rea2seg_ray.records import Query
from rea2seg_ray.runtime.inputs import (
    DUPLICATE_MARK,
    QUERY_ROW_SCHEMA,
    _done_markers,
    image_block,
    query_table,
    resolve_group,
)


def _shards(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"query_id": "q1", "image": "x.jpg", "question": "a"}) + "\n"
    )
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"query_id": "q1", "image": "y.jpg", "question": "b"}) + "\n"
    )
    pq.write_table(
        pa.Table.from_pylist([{"query_id": "q2", "image": "x.jpg", "question": "c"}]), tmp_path / "c.parquet"
    )
    (tmp_path / "x.jpg").write_bytes(b"")
    return tmp_path


def test_input_may_be_a_file_a_folder_of_mixed_shards_or_a_glob(tmp_path):
    d = _shards(tmp_path)
    assert resolve_input(str(d / "a.jsonl")).files == [str(d / "a.jsonl")]
    folder = resolve_input(str(d))
    assert folder.kind == "manifest" and [os.path.basename(f) for f in folder.files] == [
        "a.jsonl",
        "b.jsonl",
        "c.parquet",
    ]
    assert [os.path.basename(f) for f in resolve_input(str(d / "[ab].jsonl")).files] == ["a.jsonl", "b.jsonl"]
    with pytest.raises(DatasetError, match="no manifest files"):
        resolve_input(str(d / "*.csv"))
    with pytest.raises(DatasetError, match="not found"):
        resolve_input(str(d / "missing"))
    # The driver-side reader (evaluation) reads the same inputs; a repeated id across shards is an error row.
    qs = list(read_queries(str(d), strict=False))
    assert [q.query_id for q in qs][0] == "q1" and "duplicate query_id" in qs[1].meta["error"]


def _row(qid, source, row, image="img.jpg", **kw):
    s = Query(qid, image, "q").to_struct(source, row)
    s.update(kw)
    return s


def test_first_row_of_a_repeated_id_wins_and_the_others_become_error_rows():
    t = query_table([_row("q", "s3://b/m/part-1.jsonl", 4), _row("q", "s3://b/m/part-0.jsonl", 9)])
    out = resolve_group(t).to_pylist()
    assert [r["query_id"] for r in out] == ["q", f"q{DUPLICATE_MARK}s3://b/m/part-1.jsonl#row4"]
    assert (
        out[0]["source"].endswith("part-0.jsonl") and out[0]["error"] is None and out[0]["key"] == "img.jpg"
    )
    assert "duplicate query_id 'q' (first at s3://b/m/part-0.jsonl row 9)" in out[1]["error"]
    assert out[1]["key"].startswith("#error#")


def test_ids_already_written_are_skipped_duplicates_included():
    t = query_table([_row("q", "a", 1), _row("q", "b", 2), _row("r", "a", 3)])
    done = _done_markers(pa.array(["q", f"q{DUPLICATE_MARK}b#row2"]))
    assert done.column("key").to_pylist() == ["q", "q"]  # the duplicate's marker meets its original id
    q_group = pa.concat_tables([t.slice(0, 2), done])
    assert resolve_group(q_group).num_rows == 0  # both rows already written
    counted = resolve_group(q_group, keep_done=True).to_pylist()
    assert [r["error_stage"] for r in counted] == ["done", "done"]
    assert resolve_group(pa.concat_tables([t.slice(2, 1), done.slice(0, 1)])).num_rows == 1  # r: not done yet


def test_queries_of_one_image_travel_in_one_row_in_input_order():
    t = query_table([_row(f"q{i}", "a", 10 - i, image="s3://b/i.jpg") for i in range(5)])
    t = t.set_column(t.schema.get_field_index("key"), "key", t.column("image"))  # as resolve_group keys them
    rows = image_block(t).to_pylist()
    assert len(rows) == 1 and rows[0]["image_uri"] == "s3://b/i.jpg"
    assert [q["query_id"] for q in rows[0]["queries"]] == ["q4", "q3", "q2", "q1", "q0"]
    parts = image_block(t, max_queries=2).to_pylist()
    assert [p["part"] for p in parts] == [0, 1, 2] and sum(len(p["queries"]) for p in parts) == 5


def test_a_row_arrow_cannot_hold_becomes_an_error_row():
    good = _row("ok", "a", 1)
    bad = _row("bad", "a", 2)
    bad["row"] = "not a number"
    t = query_table([good, bad])
    assert t.schema == QUERY_ROW_SCHEMA and t.column("error").to_pylist()[0] is None
    assert "wrong type" in t.column("error").to_pylist()[1]


def test_a_second_run_is_refused_while_the_first_holds_the_output(tmp_path):
    first = leases.acquire(str(tmp_path), "run-1", ttl=30)
    with pytest.raises(leases.LeaseHeld, match=r"another run is writing to .*run run-1 \(host .*pid"):
        leases.acquire(str(tmp_path), "run-2", ttl=30)
    first.release()
    assert not (tmp_path / "_lease.json").exists()
    leases.acquire(str(tmp_path), "run-2", ttl=30).release()


def test_a_lease_whose_driver_died_is_taken_over(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    import socket
    import time

    (tmp_path / "_lease.json").write_text(json.dumps({"run_id": "killed", "host": socket.gethostname(),
                                                      "pid": int(dead.stdout), "expires": time.time() + 600}))  # fmt: skip
    lease = leases.acquire(str(tmp_path), "next", ttl=30)
    assert json.loads((tmp_path / "_lease.json").read_text())["run_id"] == "next"
    lease.release()


def test_limits_are_validated_where_declared_and_images_over_the_pixel_limit_are_refused_undecoded(tmp_path):
    with pytest.raises(ValueError, match="max_attempts"):
        load_config(SegmentConfig, None, ["limits.max_attempts=0"])
    assert (
        LimitsConfig().question_tokens(4096) == 2048
        and LimitsConfig(max_question_tokens=9).question_tokens(4096) == 9
    )
    Image.fromarray(np.zeros((300, 400, 3), np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(
        DecodeError, match=r"400x300 = 120000 pixels, over limits.max_image_pixels=100000"
    ) as e:
        decode((tmp_path / "big.png").read_bytes(), "big.png", max_pixels=100_000)
    assert e.value.stage == "limit"
    assert decode((tmp_path / "big.png").read_bytes(), "big.png", max_pixels=120_000)[1] == (300, 400)


def test_block_functions_equal_their_per_group_versions():
    """What the shuffles run (whole sorted blocks, vectorized) equals the per-group reference, group by group."""
    from rea2seg_ray.runtime.inputs import resolve_block

    rows = [_row("a", "s", 3, image="i1"), _row("b", "s", 1, image="i2"), _row("a", "s", 2, image="i1"),
            _row("c", "s", 4, image="i1"), _row("d", "s", 5, image="i3", error="bad row", error_stage="read")]  # fmt: skip
    t = pa.concat_tables([query_table(rows), _done_markers(pa.array(["b", "zzz"]))])
    t = t.sort_by("key")
    groups = [
        t.filter(pa.compute.equal(t.column("key"), k)) for k in sorted(set(t.column("key").to_pylist()))
    ]
    got = resolve_block(t).sort_by("query_id").to_pylist()
    want = pa.concat_tables([resolve_group(g) for g in groups]).sort_by("query_id").to_pylist()
    assert got == want and [r["query_id"] for r in got] == ["a", "a#duplicate@s#row3", "c", "d"]
    counted = (
        pa.concat_tables([resolve_group(g, keep_done=True) for g in groups]).sort_by("query_id").to_pylist()
    )
    assert resolve_block(t, keep_done=True).sort_by("query_id").to_pylist() == counted
    assert [r["error_stage"] for r in counted if r["query_id"] == "b"] == ["done"]
    keyed = pa.Table.from_pylist(got, schema=QUERY_ROW_SCHEMA).sort_by("key")
    images = image_block(keyed, max_queries=1).to_pylist()
    per_group = [r for k in sorted(set(keyed.column("key").to_pylist()))
                 for r in image_block(keyed.filter(pa.compute.equal(keyed.column("key"), k)), max_queries=1).to_pylist()]  # fmt: skip
    assert images == per_group
    assert [(r["image_uri"], r["part"], [q["query_id"] for q in r["queries"]]) for r in images][-2:] == [
        ("i1", 0, ["a"]),
        ("i1", 1, ["c"]),
    ]
