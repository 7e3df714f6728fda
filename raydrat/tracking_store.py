"""MLflow on PostgreSQL: a ``postgresql://`` tracking URI, checked before any work.

``tracking.tracking_uri`` (or ``$MLFLOW_TRACKING_URI``) may name a PostgreSQL database that
the driver and the workers write to directly (``postgresql://user:pass@host:5432/mlflow``),
as well as an ``mlflow server`` (whose own backend store is PostgreSQL on a cluster).
:func:`ready` is what the tracking layer calls on the URI it resolved:

* the driver: SQLAlchemy's default for ``postgresql://`` is psycopg2; raydrat ships psycopg
  (3) (``pip install 'raydrat[postgres]'``), so a URI without a driver uses whichever of the
  two is installed (``postgresql+psycopg://``), and none installed is one line naming the
  package to install;
* the server, reached once per process and URI before anything starts (a login with a
  5-second timeout): a server that is down, a database that does not exist or a password
  that is wrong is one line naming the host, port, database and user, never the password.

A password in the URI works, and is masked wherever raydrat writes (:mod:`raydrat.redact`);
``$PGPASSWORD`` or ``~/.pgpass`` keep it out of the URI altogether (libpq reads them).
"""

from __future__ import annotations

import importlib.util
import os
from urllib.parse import parse_qs, unquote, urlsplit

from raydrat.config import ConfigError
from raydrat.config.tracking import TrackingConfig
from raydrat.redact import redact, redact_uri, remember_uri

SCHEME = "postgresql"
DRIVERS = {"psycopg": "psycopg", "psycopg2": "psycopg2"}
"""SQLAlchemy's dialect name → the module it imports (both accept a libpq connection)."""
INSTALL = "pip install 'raydrat[postgres]' (psycopg)"
CONNECT_TIMEOUT_S = 5
_checked: set[str] = set()


def is_postgres(uri: str | None) -> bool:
    """Whether ``uri`` is a PostgreSQL store (``postgresql://`` or ``postgresql+DRIVER://``)."""
    return bool(uri) and uri.split("://", 1)[0].split("+", 1)[0].lower() == SCHEME


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def with_driver(uri: str, origin: str = "tracking.tracking_uri") -> str:
    """``uri`` with an installed driver named: ``postgresql://`` becomes
    ``postgresql+psycopg://`` when psycopg2 (SQLAlchemy's default) is absent; a named
    driver must be installed."""
    scheme, rest = uri.split("://", 1)
    _, _, driver = scheme.partition("+")
    if driver:
        module = DRIVERS.get(driver.lower())
        if module is None:
            raise ConfigError(
                f"{origin}: PostgreSQL driver {driver!r} is not supported: use postgresql://, postgresql+psycopg:// "
                "or postgresql+psycopg2://"
            )
        if not _installed(module):
            raise ConfigError(f"{origin}: the PostgreSQL driver {module} is not installed: {INSTALL}")
        return uri
    for name, module in DRIVERS.items():
        if _installed(module):
            return f"{SCHEME}+{name}://{rest}"
    raise ConfigError(f"{origin} is a PostgreSQL store but no PostgreSQL driver is installed: {INSTALL}")


def describe(uri: str) -> str:
    """Where ``uri`` points, without its password: ``host:port, database D, user U``."""
    parts = urlsplit(uri)
    query = parse_qs(parts.query)
    host = parts.hostname or (query.get("host") or ["the local socket"])[0]
    port = parts.port or 5432
    db = unquote(parts.path.lstrip("/")) or "(the user's default database)"
    user = unquote(parts.username) if parts.username else "(libpq's default user)"
    return f"{host}:{port}, database {db}, user {user}"


def check_reachable(uri: str, origin: str = "tracking.tracking_uri") -> None:
    """Log in to the database once (a few seconds at most); one line naming the server,
    never the password, if that fails."""
    scheme = uri.split("://", 1)[0]
    driver = scheme.partition("+")[2] or "psycopg"
    conninfo = f"{SCHEME}://{uri.split('://', 1)[1]}"  # libpq's own URI form, driver-independent
    where = describe(uri)
    try:
        if driver == "psycopg2":
            import psycopg2  # the optional driver, only when named

            psycopg2.connect(conninfo, connect_timeout=CONNECT_TIMEOUT_S).close()
        else:
            import psycopg  # the optional driver, only when PostgreSQL is used

            psycopg.connect(conninfo, connect_timeout=CONNECT_TIMEOUT_S).close()
    except Exception as exc:  # psycopg and psycopg2 have no common base class
        raise ConfigError(
            f"{origin}: cannot log in to the PostgreSQL store at {where}: {_reason(exc)}: "
            "check that the server is up and reachable from here, the database exists, and the user and password "
            "(in the URI, $PGPASSWORD or ~/.pgpass) are right"
        ) from None


def _reason(exc: Exception) -> str:
    """libpq's reason, short and masked (it names no password, but a URI in it may):
    ``Connection refused``, ``FATAL: password authentication failed for user "u"``."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if "FATAL:" in text:
        text = "FATAL:" + text.rsplit("FATAL:", 1)[1]
    else:
        text = text.rsplit(" failed: ", 1)[-1].split(" Is the server running", 1)[0]
    return redact(text.strip())


def ready(uri: str, origin: str = "tracking.tracking_uri") -> str:
    """The tracking URI to use for ``uri``: a PostgreSQL store with its driver named and its
    server checked (once per process and URI); any other URI unchanged."""
    if not is_postgres(uri):
        return uri
    uri = with_driver(uri, origin)
    remember_uri(uri)  # its redacted form, which Tune pickles, maps back to this one
    if uri not in _checked:
        check_reachable(uri, origin)
        _checked.add(uri)
    return uri


def check_config(tk: TrackingConfig) -> None:
    """The check :func:`ready` makes, for a run's tracking settings, before anything heavy is
    imported (the CLI, the dry run): the store they name, if it is PostgreSQL."""
    uri = tk.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if tk.enabled and is_postgres(uri):
        ready(uri, "tracking.tracking_uri" if tk.tracking_uri else "$MLFLOW_TRACKING_URI")


def ui_command(uri: str, mlflow_exe: str) -> str:
    """The command that browses a PostgreSQL store: ``mlflow ui`` on it, one worker (the
    default four die in a loop on a loaded 2-core machine), the password left to
    ``$PGPASSWORD`` (never printed)."""
    parts = urlsplit(uri)
    netloc = parts.netloc.rpartition("@")[2]
    user = f"{parts.username}@" if parts.username else ""
    bare = parts._replace(netloc=user + netloc).geturl()
    password = " (with PGPASSWORD set)" if parts.password else ""
    return f"{mlflow_exe} ui --backend-store-uri {redact_uri(bare)} --workers 1 --port 5000{password}"
