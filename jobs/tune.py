"""`ray job submit` entrypoint for sweeps (see train.py and runtime_env.yaml):

    ray job submit --runtime-env jobs/runtime_env.yaml -- \
        python tune.py smoke [--resume] [--json sweep.json]

SPACE is a shipped space name (smoke, lambda_sweep, ...) or a YAML file placed in jobs/.
Inside a job, RAY_ADDRESS is set, so the sweep's trials run on the cluster it was submitted to.
"""

import sys

from raydrat.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
