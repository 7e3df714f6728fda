"""`ray job submit` entrypoint for data preparation on the cluster (see train.py and
runtime_env.yaml):

    ray job submit --runtime-env jobs/runtime_env.yaml -- \
        python prepare.py cluster-gpt2-small.yaml --out s3://bucket/prepared/gpt2-small

Forwards its arguments to ``raydrat data prepare`` (tokenize and pack once, write the blocks
and a manifest), so the Ray Data work runs on the cluster's nodes.
"""

import sys

from raydrat.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "prepare", *sys.argv[1:]]))
