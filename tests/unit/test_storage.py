"""Retries on transient storage errors: a blip is retried, a missing object is not, and giving up names what failed."""

import pytest

from rea2seg_ray import storage


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch):
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)


def flaky(failures: int, exc: OSError):
    calls = {"n": 0}

    def fn():
        calls["n"] += 1
        if calls["n"] <= failures:
            raise exc
        return "data"

    return fn, calls


def test_a_transient_error_is_retried_until_it_passes():
    fn, calls = flaky(2, OSError("connection reset by peer"))
    assert storage.with_retries(fn, "read s3://b/k", storage.RetryPolicy(attempts=4)) == "data"
    assert calls["n"] == 3


def test_giving_up_names_what_failed_and_how_often():
    fn, calls = flaky(10, OSError("connection reset by peer"))
    with pytest.raises(OSError, match=r"read s3://b/k: still failing after 3 attempts: connection reset"):
        storage.with_retries(fn, "read s3://b/k", storage.RetryPolicy(attempts=3))
    assert calls["n"] == 3


@pytest.mark.parametrize(
    "exc",
    [FileNotFoundError("s3://b/k"), OSError("NoSuchKey: the key does not exist"), PermissionError("denied")],
)
def test_a_missing_or_forbidden_object_fails_at_once(exc):
    fn, calls = flaky(10, exc)
    with pytest.raises(type(exc)):
        storage.with_retries(fn, "read s3://b/k", storage.RetryPolicy(attempts=4))
    assert calls["n"] == 1


def test_back_off_is_jittered_and_bounded(monkeypatch):
    """Full jitter: each pause is drawn below a bound that doubles per try and stops at the cap; retries of
    clients that failed together spread out instead of arriving together."""
    import random

    policy = storage.RetryPolicy(attempts=8, base_delay_s=0.1, max_delay_s=1.0)
    rng = random.Random(0)
    for attempt, bound in enumerate([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]):
        pauses = [policy.delay(attempt, rng) for _ in range(200)]
        assert all(0 <= p <= bound for p in pauses) and max(pauses) > 0.8 * bound
        assert len({round(p, 6) for p in pauses}) > 150  # spread, not one value
    slept = []
    monkeypatch.setattr(storage.time, "sleep", slept.append)
    fn, _ = flaky(10, OSError("AWS Error SLOW_DOWN during GetObject operation"))
    with pytest.raises(OSError, match="still failing after 8 attempts"):
        storage.with_retries(fn, "read s3://b/k", policy)
    assert len(slept) == 7 and sum(slept) <= 0.1 + 0.2 + 0.4 + 0.8 + 3 * 1.0
