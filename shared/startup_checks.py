"""Checks run before anything starts, each failing with one line a person can act on.

Every message names the variable to change and never shows a password.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from shared.errors import first_line
from shared.settings import ENV_PREFIX, Settings
from shared.urls import safe_url


class SetupError(RuntimeError):
    """Something batchbridge needs is missing or unreachable; the message says what to fix."""


def ensure_data_dir(settings: Settings) -> Path:
    """Create the data directory if needed and check it is writable."""
    path = settings.data_dir
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise SetupError(
            f"{ENV_PREFIX}DATA_DIR ({path}) cannot be created or written: {exc.strerror or exc}"
        ) from None
    return path


def check_redis(url: str, *, timeout: float = 5.0) -> None:
    """PING the Redis at ``url``; SetupError naming BATCHBRIDGE_REDIS_URL if it won't answer."""
    from redis import Redis
    from redis.exceptions import AuthenticationError, RedisError

    client = Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        client.ping()
    except AuthenticationError:
        raise SetupError(
            f"Redis at {safe_url(url)} refused the password in {ENV_PREFIX}REDIS_URL"
        ) from None
    except RedisError as exc:
        raise SetupError(
            f"cannot reach Redis at {safe_url(url)} ({ENV_PREFIX}REDIS_URL): {first_line(exc)}"
        ) from None
    finally:
        client.close()


def check_database(settings: Settings) -> None:
    """Connect to the database and create the tables; SetupError saying what went wrong."""
    from sqlalchemy.exc import SQLAlchemyError

    from shared.db import make_engine

    where = safe_url(settings.sqlalchemy_url)
    try:
        make_engine(settings).dispose()
    except ModuleNotFoundError as exc:
        raise SetupError(
            f"{ENV_PREFIX}DATABASE_URL ({where}) needs the Python package {exc.name!r}, which "
            "is not installed (for PostgreSQL: pip install 'batchbridge[postgres]')"
        ) from None
    except SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None) or exc
        raise SetupError(
            f"cannot use the database at {where} ({ENV_PREFIX}DATABASE_URL): {first_line(cause)}"
        ) from None


def check_all(settings: Settings, redis_url: str) -> None:
    """Data directory, Redis and database, in the order a person would fix them."""
    ensure_data_dir(settings)
    check_redis(redis_url)
    check_database(settings)


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", ""})


def sqlite_beside_remote_redis(settings: Settings, redis_url: str) -> str | None:
    """A warning when the record is SQLite but Redis is on another host, else None.

    A Redis elsewhere means workers on other machines, and each would keep a record of its
    own in its own SQLite file, blind to the others' batches.
    """
    from urllib.parse import urlsplit

    host = urlsplit(redis_url).hostname or ""
    if not settings.sqlalchemy_url.startswith("sqlite") or host in LOOPBACK_HOSTS:
        return None
    return (
        f"the record is SQLite ({ENV_PREFIX}DATABASE_URL unset or sqlite) while Redis is on "
        f"{host}: workers on other machines cannot share it; use PostgreSQL for more than one host"
    )
