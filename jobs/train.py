"""`ray job submit` entrypoint for training.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/train.py --config raydrat/recipes/debug.yaml --set train.steps=50

Inside a job, RAY_ADDRESS is set, so the run joins the cluster the job was submitted to.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raydrat.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] == ["--config"]:
        argv = argv[1:]
    sys.exit(main(["train", *argv]))
