"""Redis and database URLs: whether they are ones the drivers take, and how to show them.

A URL may carry a password, in its ``user:password@`` part or in its query string, so what is
shown of one (status, logs, errors) goes through ``safe_url``, and an error about one never
quotes it.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlsplit, urlunsplit

_REDIS_SCHEMES = ("redis", "rediss", "unix")
# Query parameters of a URL that carry a secret (libpq: password, sslpassword; redis-py:
# password), and the names other drivers use for one.
_SECRET_QUERY = re.compile(r"pass|pwd|secret|token|key|auth|credential", re.IGNORECASE)


def check_redis_url(url: str) -> None:
    """Raise ValueError (without the password) unless ``url`` is a Redis URL redis-py takes."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a non-numeric port
    except ValueError:
        # Not urllib's message: it quotes the "port", which is often part of a password
        # holding a character that ends the netloc ('/', '#', '?').
        raise ValueError(
            "is not a URL: what follows the host's colon is not a port number (in a password, "
            "write '/', '#', '?' and '@' percent-encoded)"
        ) from None
    if parts.scheme not in _REDIS_SCHEMES:
        raise ValueError(
            f"must start with redis://, rediss:// or unix:// (got scheme {parts.scheme!r})"
        )
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError("names no host, e.g. redis://localhost:6379/0")
    if port == 0:
        raise ValueError("port 0 is not a port")
    db = parts.path.strip("/")
    if parts.scheme != "unix" and db and not db.isdigit():
        # Not quoted: a password cut short at a '/' puts its end here.
        raise ValueError("the database after the host must be a number, e.g. redis://host/0")


def check_database_url(url: str) -> None:
    """Raise ValueError (without the password) unless SQLAlchemy can parse ``url``."""
    try:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError
    except ImportError:  # a producer's base install: the workers, which connect, check it
        return

    try:
        make_url(url)
    except (ArgumentError, ValueError):
        raise ValueError(
            "is not a SQLAlchemy URL, e.g. postgresql+psycopg://user:password@host/db "
            "or sqlite:////path/to/file.db"
        ) from None


def url_secrets(url: str) -> list[str]:
    """The secrets written into ``url``: its password and any secret-named query values.

    Drivers take a password from the query string too (``?password=`` for redis-py and
    libpq), so masking only the ``user:password@`` part would print it in clear.
    """
    try:
        parts = urlsplit(url)
        found = [parts.password] if parts.password else []
        pairs = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        return []
    return found + [value for name, value in pairs if value and _SECRET_QUERY.search(name)]


def safe_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, fit for logs and status output."""
    try:
        parts = urlsplit(url)
        if parts.password is not None:
            host = parts.hostname or ""
            if parts.port is not None:
                host = f"{host}:{parts.port}"
            parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
        if parts.query:
            parts = parts._replace(query=_masked_query(parts.query))
        return urlunsplit(parts)
    except ValueError:
        return "<unparseable URL>"


def _masked_query(query: str) -> str:
    # Masked in the text as written, so nothing else about the query changes.
    fields = []
    for field in query.split("&"):
        name, sep, value = field.partition("=")
        secret = sep and value and _SECRET_QUERY.search(name)
        fields.append(f"{name}=***" if secret else field)
    return "&".join(fields)
