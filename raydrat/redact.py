"""Credentials are never written: every writer of raydrat passes text through :func:`redact`.

What counts as a secret:

* the password of a URI (``http://user:PASSWORD@host``: a tracking URI with basic auth), in
  any text, masked as ``user:***@host``;
* the value of a credential environment variable (:data:`SECRET_ENV`: AWS secret keys and
  session tokens, MLflow's password and token, Ray's auth token), wherever it appears;
* any value registered with :func:`register` (e.g. a password taken from a config).

:func:`redact` masks them in a string, :func:`redact_obj` in nested dicts and lists (a config
dict before it goes to MLflow params, ``raydrat_run.json``, a checkpoint or a Tune trial
config), :func:`redact_uri` in one URI. The functions are pure apart from reading
``os.environ``; they import nothing of raydrat, so any layer may call them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

MASK = "***"
SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "RAY_AUTH_TOKEN",
)
"""Environment variables whose values are secrets (the access key *id* is not: it names the
credentials in error messages, see :func:`describe_aws_credentials`)."""
URI_ENV = ("MLFLOW_TRACKING_URI",)
"""Environment variables holding URIs whose password is a secret."""
MIN_SECRET_LEN = 4
"""Shorter values are not masked on their own (they would mask ordinary text); a URI's
password is masked whatever its length."""

_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@]*):(?P<password>[^/\s@]*)@")
_registered: set[str] = set()
_uris: dict[str, str] = {}


def uri_password(uri: str | None) -> str | None:
    """The password in ``uri``'s user info, or ``None``."""
    m = _USERINFO.search(uri or "")
    return m.group("password") if m and m.group("password") else None


def redact_uri(uri: str | None) -> str | None:
    """``uri`` with the password of its user info replaced by ``***`` (the user name stays,
    so the URI still says whose credentials it holds)."""
    if uri is None:
        return None
    return _USERINFO.sub(lambda m: f"{m.group('head')}:{MASK}@" if m.group("password") else m.group(0), uri)


def register(*values: str | None) -> None:
    """Treat ``values`` as secrets from now on, in this process (e.g. a config's password)."""
    _registered.update(v for v in values if v and len(v) >= MIN_SECRET_LEN)


def remember_uri(uri: str | None) -> None:
    """Register ``uri``'s password as a secret and remember the URI, so that an object that
    holds only its redacted form (one Tune pickles to disk: a searcher, a callback) can get
    the real one back in this process (:func:`reveal_uri`)."""
    password = uri_password(uri)
    if password:
        register(password)
        _uris[redact_uri(uri)] = uri


def reveal_uri(uri: str | None) -> str | None:
    """The URI :func:`remember_uri` remembered for the redacted ``uri`` (else ``uri`` itself)."""
    return _uris.get(uri, uri) if uri else uri


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Every secret known here: the credential variables' values, the passwords of URIs in
    :data:`URI_ENV`, and the registered values; longest first (so a secret that contains
    another is masked whole)."""
    env = os.environ if environ is None else environ
    out = set(_registered)
    out.update(env[k] for k in SECRET_ENV if len(env.get(k) or "") >= MIN_SECRET_LEN)
    out.update(p for k in URI_ENV if (p := uri_password(env.get(k))))
    return sorted(out, key=len, reverse=True)


def redact(text: str, extra: Iterable[str] = ()) -> str:
    """``text`` with URI passwords and every known secret (plus ``extra``) masked."""
    if not text:
        return text
    out = redact_uri(text)
    for secret in [*sorted((e for e in extra if e), key=len, reverse=True), *secret_values()]:
        if secret in out:
            out = out.replace(secret, MASK)
    return out


def redact_obj(obj: Any) -> Any:
    """A copy of ``obj`` (dicts, lists, tuples, strings, scalars) with every string redacted."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, Mapping):
        return {k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_obj(v) for v in obj)
    return obj


def describe_aws_credentials(environ: Mapping[str, str] | None = None) -> str:
    """Which AWS credentials a client here would use, named without the secret: the access
    key id (shortened) and where it came from, the profile, or the default chain."""
    env = os.environ if environ is None else environ
    key = env.get("AWS_ACCESS_KEY_ID")
    if key:
        shown = key if len(key) <= 8 else f"{key[:4]}…{key[-4:]}"
        token = " with a session token" if env.get("AWS_SESSION_TOKEN") else ""
        return f"access key id {shown} from AWS_ACCESS_KEY_ID{token}"
    if env.get("AWS_PROFILE"):
        return f"profile {env['AWS_PROFILE']!r} (AWS_PROFILE) from ~/.aws"
    if env.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
        return "the web identity token in AWS_WEB_IDENTITY_TOKEN_FILE (IRSA / workload identity)"
    return "the default chain (~/.aws/credentials, then the instance or pod role)"
