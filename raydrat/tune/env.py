"""What a sweep hands to Ray besides the trials' configs: no credentials.

Ray Tune copies ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN`` and
``AWS_SECURITY_TOKEN`` from the driver's environment into the ``runtime_env`` of every trial
actor (``ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE``), and Ray's runtime-env
agent writes each runtime env it sets up, variables included, to the session's logs
(``runtime_env_agent.log``). raydrat's trials need no such copy: on a local instance every
Ray worker inherits the driver's environment already, and on a cluster each node reads S3
with its own credentials (instance profile, IRSA / workload identity, a credentials file),
see docs/distributed.md. :func:`keep_credentials_out_of_runtime_envs` takes those names off
Tune's list for this process (it changes Ray's list in place: there is no option for it)."""

from __future__ import annotations

from ray.tune.execution import class_cache

AWS_CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def keep_credentials_out_of_runtime_envs() -> None:
    """Stop Ray Tune from copying the driver's AWS credentials into trial runtime envs."""
    class_cache.ENV_VARS_TO_PROPAGATE.difference_update(AWS_CREDENTIAL_VARS)
