"""`ray job submit` entrypoint for training (run from the root of a raydrat checkout, the
wheel built into jobs/dist/ first: jobs/runtime_env.yaml says how):

    ray job submit --runtime-env jobs/runtime_env.yaml -- \
        python train.py debug --set train.steps=50

The job's working directory is jobs/ (so the entrypoint is `train.py`, and a config file
placed in jobs/, like cluster-gpt2-small.yaml, is found by its name); raydrat itself is the
wheel Ray's pip runtime env installed. Inside a job, RAY_ADDRESS is set, so the run joins the
cluster the job was submitted to.
"""

import sys

from raydrat.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] == ["--config"]:
        argv = argv[1:]
    sys.exit(main(["train", *argv]))
