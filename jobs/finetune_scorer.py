"""Entrypoint for `ray job submit`: the same job as `rea2seg finetune`.

    ray job submit --working-dir . -- python jobs/finetune_scorer.py data=s3://bucket/scoring-data \
        output=s3://bucket/scorer-runs/r1 train.num_workers=8 train.use_gpu=true
"""

import sys

from rea2seg_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
