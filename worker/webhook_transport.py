"""An httpx client for webhooks that checks every address at connect time (the SSRF guard).

The submit-time check (``shared.webhook_urls``) is not enough alone: a name may resolve to a
public address when submitted and to 127.0.0.1 when the webhook is sent (DNS rebinding). So
the client resolves the host itself when it opens a connection, refuses the connection if
any address is refused, and connects to a vetted address, never to the name. The URL is left
as it is, so the Host header, TLS SNI and the certificate check all use the original name.

What ``client.post`` raises:

- ``WebhookAddressRefused`` when an address is refused (it passes through httpx unwrapped;
  it is not an ``httpx.HTTPError``, so catch it first or separately);
- ``httpx.ConnectError`` when the host does not resolve or no address accepts a connection;
- the usual ``httpx.HTTPError`` subclasses otherwise (timeouts, protocol errors, ...).

Redirects are never followed: a 3xx comes back as the response.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence
from importlib.metadata import PackageNotFoundError, version

import anyio
import httpcore
import httpx

from shared.settings import Settings
from shared.webhook_urls import IPAddress, IPNetwork, host_ip, refused_addresses, unique_addresses

# (host, port) -> every address the host resolves to; raises OSError when it does not.
AsyncResolver = Callable[[str, int], Awaitable[list[IPAddress]]]


class WebhookAddressRefused(Exception):
    """A webhook host is, or resolves to, an address webhooks may not reach (the SSRF guard)."""


async def system_resolver(host: str, port: int) -> list[IPAddress]:
    """Every address the system resolver gives for ``host`` (both families)."""
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return unique_addresses(str(info[4][0]) for info in infos)


class GuardedBackend(httpcore.AnyIOBackend):
    """An httpcore network backend that connects only to vetted addresses."""

    def __init__(self, allow: Sequence[IPNetwork], resolver: AsyncResolver | None = None) -> None:
        self._allow = tuple(allow)
        self._resolver = resolver or system_resolver

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Resolve ``host``, refuse it if any address is refused, else connect to one."""
        addresses = await self._addresses(host, port, timeout)
        refusal = refused_addresses(host, addresses, self._allow)
        if refusal is not None:
            raise WebhookAddressRefused(f"webhook host {host!r} {refusal}")
        last_error: Exception | None = None
        for ip in addresses:
            try:
                return await super().connect_tcp(
                    str(ip),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last_error = exc
        assert last_error is not None  # _addresses never returns an empty list
        raise last_error

    async def _addresses(self, host: str, port: int, timeout: float | None) -> list[IPAddress]:
        try:
            literal = host_ip(host)
        except ValueError as exc:
            raise WebhookAddressRefused(f"webhook host {host!r} {exc}") from None
        if literal is not None:
            return [literal]
        try:
            with anyio.fail_after(timeout):
                addresses = await self._resolver(host, port)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving webhook host {host!r} timed out") from None
        except (OSError, UnicodeError) as exc:
            raise httpcore.ConnectError(f"webhook host {host!r} does not resolve: {exc}") from None
        if not addresses:
            raise httpcore.ConnectError(f"webhook host {host!r} does not resolve")
        return addresses


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport, with a connection pool that uses ``GuardedBackend``."""

    def __init__(
        self, backend: GuardedBackend, limits: httpx.Limits, ssl_context: ssl.SSLContext | None
    ) -> None:
        context = ssl_context or httpx.create_ssl_context(trust_env=False)
        # Handed to httpx too, or it would build a second one (16 ms of CPU each, measured).
        super().__init__(verify=context, trust_env=False, limits=limits)
        # httpx offers no public way to hand its pool a network backend, so the pool it built
        # is replaced by an equivalent one that uses ours (the one private attribute touched).
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=backend,
        )


def user_agent() -> str:
    """The User-Agent webhooks are sent with."""
    try:
        return f"batchbridge-webhooks/{version('batchbridge')}"
    except PackageNotFoundError:
        return "batchbridge-webhooks/0.1"


def guarded_client(
    settings: Settings,
    *,
    resolver: AsyncResolver | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> httpx.AsyncClient:
    """An AsyncClient for webhooks: addresses vetted at connect time, no redirects or proxies.

    ``resolver`` replaces the system resolver and ``ssl_context`` the default certificate
    checks (tests, a private CA); certificates are always checked against the URL's host.
    """
    limits = httpx.Limits(
        max_connections=settings.webhook_concurrency,
        max_keepalive_connections=settings.webhook_concurrency,
    )
    backend = GuardedBackend(settings.webhook_allow_cidrs, resolver)
    return httpx.AsyncClient(
        transport=GuardedTransport(backend, limits, ssl_context),
        # A proxy from the environment would connect on our behalf, unchecked.
        trust_env=False,
        follow_redirects=False,
        timeout=httpx.Timeout(settings.webhook_timeout_seconds),
        headers={"User-Agent": user_agent()},
    )
