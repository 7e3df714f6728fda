"""`ray job submit` entrypoint for data preparation on the cluster.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/prepare.py CONFIG [--set data.sources=...]

Forwards its arguments to ``raydrat data prepare`` (tokenize and pack once, write the blocks
and a manifest), so the Ray Data work runs on the cluster's nodes.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raydrat.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "prepare", *sys.argv[1:]]))
