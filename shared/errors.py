"""Turning any exception into one line a person can act on, with no password in it."""

from __future__ import annotations

import os
from urllib.parse import quote, unquote

from shared.settings import ENV_PREFIX
from shared.urls import url_secrets

_URL_VARIABLES = (f"{ENV_PREFIX}DATABASE_URL", f"{ENV_PREFIX}REDIS_URL")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, with any configured password masked."""
    text = str(exc).strip() or type(exc).__name__
    return redact(text.splitlines()[0])


def redact(text: str) -> str:
    """``text`` with the passwords of the configured URLs replaced by ``***``.

    Drivers echo the URL they were given in their errors; this keeps that from reaching a
    terminal or a log.
    """
    for name in _URL_VARIABLES:
        for secret in url_secrets(os.environ.get(name, "")):
            # A driver may echo it as written in the URL or decoded.
            for form in {secret, unquote(secret), quote(secret, safe="")}:
                text = text.replace(form, "***")
    return text


def describe_error(exc: BaseException) -> str:
    """One line saying what failed and, where known, which variable to look at."""
    from redis.exceptions import AuthenticationError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
    from sqlalchemy.exc import SQLAlchemyError

    if isinstance(exc, AuthenticationError):
        return f"Redis refused the password in {ENV_PREFIX}REDIS_URL"
    if isinstance(exc, RedisConnectionError | RedisTimeoutError):
        return f"cannot reach Redis ({ENV_PREFIX}REDIS_URL): {first_line(exc)}"
    if isinstance(exc, SQLAlchemyError):
        cause = getattr(exc, "orig", None) or exc
        return f"cannot use the database ({ENV_PREFIX}DATABASE_URL): {first_line(cause)}"
    if isinstance(exc, ModuleNotFoundError):
        return f"the Python package {exc.name!r} is not installed"
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or first_line(exc)}"
    return f"{type(exc).__name__}: {first_line(exc)}"


def exit_code_for(exc: BaseException) -> int:
    """2 for set-up problems (Redis, the database, a missing package), 1 for the rest."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
    from sqlalchemy.exc import OperationalError

    setup = (RedisConnectionError, RedisTimeoutError, OperationalError, ModuleNotFoundError)
    return 2 if isinstance(exc, setup) else 1
