"""Run provenance: weight digests are sha256 of the files, cached per node by size and modification time; the
config hash follows the config."""

import hashlib
import os

from rea2seg_ray import provenance
from rea2seg_ray.config import SegmentConfig


def test_weight_digests_hash_every_weight_file_once_per_node(tmp_path, monkeypatch):
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "model-00001.safetensors").write_bytes(b"a" * 1000)
    (model / "sub" / "extra.bin").write_bytes(b"b" * 10)
    (model / "config.json").write_text("{}")  # not a weight file
    calls = []
    real = provenance._sha256
    monkeypatch.setattr(provenance, "_sha256", lambda p: calls.append(p.name) or real(p))
    cache = tmp_path / "cache"
    want = {
        "model-00001.safetensors": hashlib.sha256(b"a" * 1000).hexdigest(),
        "sub/extra.bin": hashlib.sha256(b"b" * 10).hexdigest(),
    }
    assert provenance.weight_digests(model, str(cache)) == want and len(calls) == 2
    assert provenance.weight_digests(model, str(cache)) == want and len(calls) == 2  # from the node's cache
    # A rewritten file (new size or mtime) is hashed again; the other is not.
    (model / "sub" / "extra.bin").write_bytes(b"c" * 11)
    os.utime(model / "sub" / "extra.bin", ns=(1, 1))
    got = provenance.weight_digests(model, str(cache))
    assert got["sub/extra.bin"] == hashlib.sha256(b"c" * 11).hexdigest() and calls[2:] == ["extra.bin"]
    # A single checkpoint file is its own model.
    assert provenance.weight_digests(model / "model-00001.safetensors", str(cache)) == {
        "model-00001.safetensors": want["model-00001.safetensors"]
    }


def test_config_hash_changes_with_the_config():
    a, b = SegmentConfig(), SegmentConfig()
    assert provenance.config_hash(a) == provenance.config_hash(b)
    b.discovery.max_candidates += 1
    assert provenance.config_hash(a) != provenance.config_hash(b)
    record = provenance.run_record(a, "r1", {})
    assert record["run_id"] == "r1" and record["config"]["discovery"]["max_candidates"] == 8
    assert "ray" in record["packages"] and record["config_hash"] == provenance.config_hash(a)
