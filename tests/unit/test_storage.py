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
    assert storage.with_retries(fn, "read s3://b/k", retries=3) == "data"
    assert calls["n"] == 3


def test_giving_up_names_what_failed_and_how_often():
    fn, calls = flaky(10, OSError("connection reset by peer"))
    with pytest.raises(OSError, match=r"read s3://b/k: still failing after 3 attempts: connection reset"):
        storage.with_retries(fn, "read s3://b/k", retries=2)
    assert calls["n"] == 3


@pytest.mark.parametrize(
    "exc",
    [FileNotFoundError("s3://b/k"), OSError("NoSuchKey: the key does not exist"), PermissionError("denied")],
)
def test_a_missing_or_forbidden_object_fails_at_once(exc):
    fn, calls = flaky(10, exc)
    with pytest.raises(type(exc)):
        storage.with_retries(fn, "read s3://b/k", retries=3)
    assert calls["n"] == 1
