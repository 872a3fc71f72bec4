"""Entrypoint for `ray job submit`: the same job as `rea2seg segment`.

ray job submit --working-dir . -- python jobs/segment.py input=s3://bucket/manifest.jsonl output=s3://bucket/run1
"""

import sys

from rea2seg_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["segment", *sys.argv[1:]]))
