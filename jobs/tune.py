"""`ray job submit` entrypoint for a Tune sweep.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/tune.py tune_spaces/sync_steps.yaml --set tracking.tracking_uri=http://mlflow:5000

Forwards its arguments to ``raydrat tune`` (the sweep subcommand). Inside a job RAY_ADDRESS
is set, so the trials run on the cluster the job was submitted to.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raydrat.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
