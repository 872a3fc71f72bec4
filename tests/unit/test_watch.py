"""Cluster faults without a cluster: which errors a resumed attempt can repair, and the watch that stops a run no
alive node can serve (its check and its interruption of the waiting thread)."""

import threading
import time

import pytest
import ray.exceptions as rx

from rea2seg_ray.config import PoolConfig
from rea2seg_ray.pipeline import watch


def test_ray_losses_are_found_behind_the_wrappers_that_carry_them():
    lost = rx.OwnerDiedError("ab" * 14, None, "")
    try:
        try:
            raise lost
        except rx.ObjectLostError as e:
            raise RuntimeError("Write failed") from e  # what a Ray Data operator raises
    except RuntimeError as wrapped:
        assert watch.cluster_fault(wrapped) is lost
    task = rx.RayTaskError("fn", "traceback", rx.NodeDiedError("node 1 died"))
    assert isinstance(watch.cluster_fault(task), rx.NodeDiedError)
    assert isinstance(watch.cluster_fault(rx.ActorDiedError()), rx.ActorDiedError)


@pytest.mark.parametrize("error", [ValueError("bad config"), KeyError("x"), RuntimeError("a bug")])
def test_anything_else_is_not_a_cluster_fault(error):
    assert watch.cluster_fault(error) is None


def test_a_pool_needs_what_one_of_its_actors_reserves():
    pool = PoolConfig(num_cpus=4, num_gpus=1, resources={"discovery": 0.01})
    assert watch.pool_needs(pool) == {"CPU": 4.0, "GPU": 1.0, "discovery": 0.01}
    assert watch.fits(watch.pool_needs(pool), {"CPU": 16, "GPU": 1, "discovery": 1})
    assert not watch.fits(watch.pool_needs(pool), {"CPU": 16, "GPU": 1})  # the node type without the resource
    assert not watch.fits(watch.pool_needs(pool), {"CPU": 2, "GPU": 1, "discovery": 1})


def _nodes(monkeypatch, offered):
    monkeypatch.setattr(
        watch, "alive_nodes", lambda: [{"id": str(i), "resources": r} for i, r in enumerate(offered)]
    )


def test_the_watch_stops_the_waiting_thread_with_the_pool_and_its_needs(monkeypatch):
    _nodes(monkeypatch, [{"CPU": 1.0}, {"CPU": 8.0, "scorer": 1.0}])  # the discovery node is gone
    pools = {
        "discovery": PoolConfig(resources={"discovery": 1}),
        "scorer": PoolConfig(resources={"scorer": 1}),
    }
    t0 = time.monotonic()
    with pytest.raises(watch.Unschedulable) as e:
        with watch.ResourceWatch(pools, timeout_s=0.3, interval_s=0.05):
            while time.monotonic() - t0 < 10:  # a thread waiting on Ray Data, in Python
                time.sleep(0.01)
    assert time.monotonic() - t0 < 5
    msg = str(e.value)
    assert "discovery pool needs ({'CPU': 1.0, 'discovery': 1.0})" in msg and "scorer pool" not in msg
    assert "rerun the same command" in msg


def test_the_watch_lets_a_run_go_on_when_the_node_comes_back_in_time(monkeypatch):
    offered = [[{"CPU": 1.0}]]
    monkeypatch.setattr(watch, "alive_nodes", lambda: [{"id": "0", "resources": r} for r in offered[0]])
    pools = {"discovery": PoolConfig(resources={"discovery": 1})}
    back = threading.Timer(0.15, lambda: offered.__setitem__(0, [{"CPU": 4.0, "discovery": 1.0}]))
    back.start()
    with watch.ResourceWatch(pools, timeout_s=0.6, interval_s=0.05) as w:
        time.sleep(1.0)
    assert w.message == "" and not w.unserved()


def test_with_no_timeout_the_watch_only_logs(monkeypatch):
    _nodes(monkeypatch, [{"CPU": 1.0}])
    with watch.ResourceWatch(
        {"discovery": PoolConfig(resources={"discovery": 1})}, timeout_s=0, interval_s=0.05
    ):
        time.sleep(0.3)
