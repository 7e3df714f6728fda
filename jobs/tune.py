"""`ray job submit` entrypoint for sweeps.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/tune.py tune_spaces/smoke.yaml [--resume] [--json sweep.json]

Inside a job, RAY_ADDRESS is set, so the sweep's trials run on the cluster it was submitted to.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raydrat.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
