"""cluster/: every manifest and YAML parses and says what users rely on; placement on a simulated two-node cluster
survives swapping a node mid-run; losing the node of both pools stops a run clearly, and a rerun finishes on the
nodes that remain after losing another; the submit script runs a job and follows it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml

from rea2seg_ray.config import SegmentConfig, load_config
from rea2seg_ray.datasets.synthetic import write_scenes

from ..conftest import REPO

CLUSTER = REPO / "cluster"
PINNED_RAY = "2.60.0"


def _yamls():
    return sorted(p for p in CLUSTER.rglob("*.y*ml"))


def _entry_script(entrypoint: str) -> Path:
    words = entrypoint.split()
    script = next(w for w in words if w.endswith(".py"))
    return REPO / script


def test_pinned_ray_matches_the_installed_one():
    assert ray.__version__ == PINNED_RAY
    assert f"ray[data,train,default]=={PINNED_RAY}" in (REPO / "pyproject.toml").read_text()


@pytest.mark.parametrize("path", _yamls(), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_cluster_yaml_parses_and_is_consistent(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs, f"{path} is empty"
    for doc in docs:
        kind = doc.get("kind")
        if kind == "RayCluster":
            _check_raycluster(doc["spec"])
        elif kind == "RayJob":
            spec = doc["spec"]
            script = _entry_script(spec["entrypoint"])
            assert script.exists(), f"{path}: entrypoint {script} is not in the repo"
            assert spec["shutdownAfterJobFinishes"] is True
            assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
            yaml.safe_load(spec["runtimeEnvYAML"])
            if "--config" in spec["entrypoint"]:
                cfg = spec["entrypoint"].split("--config", 1)[1].split()[0]
                load_config(SegmentConfig, REPO / cfg, [])  # the named config is valid
            segmenting = script.name == "segment.py"
            _check_raycluster(spec["rayClusterSpec"], stage_groups=segmenting)
        elif "available_node_types" in doc:  # cluster launcher
            types = doc["available_node_types"]
            assert types[doc["head_node_type"]]["resources"].get("GPU", 0) == 0
            assert any(t["resources"].get("discovery") for t in types.values())
            assert any(t["resources"].get("scorer") for t in types.values())
            assert doc["idle_timeout_minutes"] > 0
            assert any(f"=={PINNED_RAY}" in c for c in doc["setup_commands"])
        elif "env_vars" in doc or "excludes" in doc:  # runtime env
            assert "/.venv" in doc["excludes"]
            assert all(isinstance(v, str) for v in doc["env_vars"].values())
        else:
            pytest.fail(f"{path}: unrecognised YAML document")


def _check_raycluster(spec, stage_groups: bool = True):
    """stage_groups: the cluster runs segmentation, so it must offer both a discovery and a scorer node type."""
    assert spec["rayVersion"] == PINNED_RAY
    assert spec.get("authOptions", {}).get("mode") == "token"
    head = spec["headGroupSpec"]
    (hc,) = head["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in hc["resources"].get("limits", {})
    assert PINNED_RAY in hc["image"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    wanted = {"discovery", "scorer"}
    found = set()
    for g in groups.values():
        (c,) = g["template"]["spec"]["containers"]
        assert PINNED_RAY in c["image"]
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert any(t["key"] == "nvidia.com/gpu" for t in g["template"]["spec"]["tolerations"])
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        if "resources" in g["rayStartParams"]:
            found |= set(json.loads(json.loads(g["rayStartParams"]["resources"]))) & wanted
    if stage_groups:
        assert found == wanted


def test_named_cluster_config_pins_pools_to_node_types():
    cfg = load_config(SegmentConfig, "cluster.yaml", [])
    assert dict(cfg.discover_pool.resources) == {"discovery": 0.01} and cfg.discover_pool.num_gpus == 1
    assert dict(cfg.score_pool.resources) == {"scorer": 0.01} and cfg.score_pool.num_gpus == 1


@pytest.mark.slow
def test_two_node_placement_survives_swapping_the_discovery_node(model_cache, tmp_path):
    manifest = write_scenes(tmp_path / "scenes", 48, seed=55)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "tests" / "integration" / "placement_run.py"),
            str(manifest),
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads([line for line in r.stdout.splitlines() if line.startswith('{"node_a"')][-1])
    assert res["node_c"], "the discovery node was never swapped"
    disc = {node for cls, node in res["actors"] if "DiscoverStage" in cls}
    score = {node for cls, node in res["actors"] if "ScoreStage" in cls}
    assert score == {res["node_b"]}  # scorers only on the scorer node
    assert (
        disc <= {res["node_a"], res["node_c"]} and res["node_c"] in disc
    )  # discovery only on discovery nodes
    assert res["written"] == res["rows_in"] == res["ok"] == 48


@pytest.mark.slow
def test_node_loss_stops_clearly_without_a_node_and_finishes_on_the_remaining_nodes(model_cache, tmp_path):
    import pyarrow.dataset as pads

    manifest = write_scenes(tmp_path / "scenes", 120, seed=57)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run(
        [sys.executable, str(REPO / "tests" / "integration" / "node_loss_run.py"), str(manifest), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads([line for line in r.stdout.splitlines() if line.startswith('{"first"')][-1])
    first, second = res["first"], res["second"]
    # The only node offering the pools' resources (holding both pools' actors) is lost after the run wrote rows:
    # the run stops, saying which pools lack what, and keeps what it wrote.
    assert len(first.get("removed", {}).get("actors", [])) == 2, first
    assert first.get("failed") == "Unschedulable", first
    assert "discovery pool" in first["message"] and "rerun the same command" in first["message"], first
    assert first["after_loss_s"] < 120 and first["rows_kept"] > 0, first
    # The same run again on a new node: it resumes; that node, now holding both pools' actors, is swapped for
    # another mid-run; the run finishes there, every query exactly once.
    assert len(second.get("removed", {}).get("actors", [])) == 2, second
    assert "failed" not in second, second
    assert second["rows_in"] == 120 and second["skipped"] == first["rows_kept"], second
    assert second["skipped"] + second["written"] == 120, second
    files = sorted(str(f) for f in (tmp_path / "out" / "predictions").glob("*.parquet"))  # not *.parquet.torn
    rows = pads.dataset(files, format="parquet").to_table().to_pylist()
    assert len(rows) == 120 == len({x["query_id"] for x in rows})
    assert all(x["status"] == "ok" for x in rows), [x["error"] for x in rows if x["status"] != "ok"]


@pytest.mark.slow
def test_submit_script_runs_and_follows_a_job(ray_cluster, tmp_path):
    manifest = write_scenes(tmp_path / "scenes", 4, seed=66)
    env = dict(os.environ, RAY_AUTH_MODE="token")
    r = subprocess.run(
        [sys.executable, str(CLUSTER / "submit.py"), "--address", ray_cluster["dashboard"], "--python", sys.executable,
         "segment", f"input={manifest}", f"output={tmp_path / 'out'}", "ray.progress_bars=false"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.startswith("submitted raysubmit_")
    assert "4 written: 4 ok, 0 error" in r.stdout and "SUCCEEDED" in r.stdout
