"""Installed in every worker of one test's job by Ray's ``worker_process_setup_hook`` (never imported by the
project): the Discoverer kills its own process whenever it is handed a query asking ``CRASH``, i.e. a query that
crashes its worker every time it is processed (and one asking ``HANG`` never returns). The production code is untouched; only this job's workers are."""

import os
import time

CRASH = "crash this worker"
HANG = "hang this worker"


def install() -> None:
    from rea2seg_ray.discovery import discoverer

    original = discoverer.Discoverer.discover

    def discover(self, queries, images):
        if any(CRASH in q.text() for q in queries):
            os._exit(1)  # as abrupt as the OOM killer: no exception, no clean-up
        if any(HANG in q.text() for q in queries):
            time.sleep(3600)  # a call that never returns
        return original(self, queries, images)

    discoverer.Discoverer.discover = discover
