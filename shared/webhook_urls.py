"""The SSRF guard for webhook URLs: which URLs and addresses a webhook may be sent to.

Pure and stdlib-only (the producer imports it). The worker repeats the address check at
connect time (``worker.webhook_transport``), so a name that re-resolves elsewhere after
submit (DNS rebinding) is still refused.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterable, Sequence
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
)
from urllib.parse import urlsplit

from shared.schemas import InvalidRequest

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network
# (host, port) -> every address the host resolves to; raises OSError when it does not.
Resolver = Callable[[str, int], list[IPAddress]]

MAX_URL_LENGTH = 2048
ALLOW_ENV = "BATCHBRIDGE_WEBHOOK_ALLOW_CIDRS"
_DEFAULT_PORTS = {"http": 80, "https": 443}
# RFC 3986 characters only: whitespace, controls, backslashes and non-ASCII are where URL
# parsers disagree (and IDNA maps fullwidth digits to ASCII ones), so none reach a parser.
_URL_CHARS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]*")
_DNS_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
# WHATWG URL: a host whose last label is a number is an IPv4 address (or invalid), never a name.
_NUMERIC_LABEL = re.compile(r"0[xX][0-9a-fA-F]*|[0-9]+")

# Checked in order; the first network holding the address names the refusal. Sources: the
# IANA IPv4/IPv6 special-purpose address registries. ``ipaddress.is_global`` is not enough on
# its own: on Python 3.11 it calls multicast, 6to4 and NAT64 forms of 127.0.0.1 global.
_V4_REFUSED: tuple[tuple[IPv4Network, str], ...] = tuple(
    (IPv4Network(net), why)
    for net, why in (
        ("0.0.0.0/32", "unspecified"),
        ("0.0.0.0/8", "'this network' (0.0.0.0/8)"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "CGNAT (100.64.0.0/10)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.169.254/32", "link-local (cloud metadata)"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "reserved (IETF protocol assignments)"),
        ("192.0.2.0/24", "documentation (TEST-NET-1)"),
        ("192.88.99.0/24", "reserved (6to4 relay anycast)"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking (198.18.0.0/15)"),
        ("198.51.100.0/24", "documentation (TEST-NET-2)"),
        ("203.0.113.0/24", "documentation (TEST-NET-3)"),
        ("224.0.0.0/4", "multicast"),
        ("255.255.255.255/32", "broadcast"),
        ("240.0.0.0/4", "reserved (240.0.0.0/4)"),
    )
)
_V6_REFUSED: tuple[tuple[IPv6Network, str], ...] = tuple(
    (IPv6Network(net), why)
    for net, why in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("64:ff9b:1::/48", "local-use NAT64 (64:ff9b:1::/48)"),
        ("100::/64", "discard-only (100::/64)"),
        ("2001:db8::/32", "documentation (2001:db8::/32)"),
        ("2001:2::/48", "benchmarking (2001:2::/48)"),
        ("2001::/23", "reserved (IETF protocol assignments)"),
        ("3fff::/20", "documentation (3fff::/20)"),
        ("5f00::/16", "reserved (SRv6 SIDs)"),
        ("fc00::/7", "unique-local"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local (deprecated)"),
        ("ff00::/8", "multicast"),
    )
)
_MAPPED = IPv6Network("::ffff:0:0/96")
_COMPATIBLE = IPv6Network("::/96")
_NAT64 = IPv6Network("64:ff9b::/96")
_TEREDO = IPv6Network("2001::/32")
_GLOBAL_UNICAST = IPv6Network("2000::/3")


def address_refusal(ip: IPAddress, allow: Sequence[IPNetwork]) -> str | None:
    """None if a webhook may connect to ``ip``, else why not ("loopback", "private", ...)."""
    if isinstance(ip, IPv6Address) and ip.scope_id:
        return "an IPv6 address with a zone id"
    if isinstance(ip, IPv6Address) and ip in _MAPPED:
        # ::ffff:a.b.c.d is a.b.c.d on a dual-stack socket, so it is judged (and allowed) as it.
        ip = IPv4Address(int(ip) & 0xFFFFFFFF)
    if any(ip in net for net in allow if net.version == ip.version):
        return None
    if isinstance(ip, IPv4Address):
        return _v4_refusal(ip)
    return _v6_refusal(ip)


def _v4_refusal(ip: IPv4Address) -> str | None:
    for net, why in _V4_REFUSED:
        if ip in net:
            return why
    # Belt and braces for ranges added to the registry after this table was written.
    return None if ip.is_global else "not globally routable"


def _v6_refusal(ip: IPv6Address) -> str | None:
    if ip in _COMPATIBLE and int(ip) > 1:
        inner = IPv4Address(int(ip) & 0xFFFFFFFF)
        return f"IPv4-compatible IPv6 (deprecated; embeds {inner})"
    # Transition addresses reach the IPv4 address inside them: judge that address (without
    # the allow-list, which opens addresses as written, not tunnels to them).
    embedded: list[IPv4Address] = []
    kind = ""
    if ip in _NAT64:
        kind, embedded = "NAT64", [IPv4Address(int(ip) & 0xFFFFFFFF)]
    elif ip in _TEREDO and ip.teredo is not None:
        kind, embedded = "Teredo", list(ip.teredo)
    elif ip.sixtofour is not None:
        kind, embedded = "6to4", [ip.sixtofour]
    if kind:
        for inner in embedded:
            why = _v4_refusal(inner)
            if why is not None:
                return f"{kind} IPv6 embedding {inner} ({why})"
        return None
    for net, why in _V6_REFUSED:
        if ip in net:
            return why
    if ip not in _GLOBAL_UNICAST:
        return "reserved (outside global unicast 2000::/3)"
    return None if ip.is_global else "not globally routable"


def parse_ipv4(host: str) -> IPv4Address | None:
    """The IPv4 address a numeric host spells as inet_aton reads it (127.1, 0x7f000001, ...).

    None when the host is a name; ValueError when it looks numeric (its last label is a
    number, as the WHATWG URL standard puts it) but is no valid address, e.g. ``1.2.3.256``.
    """
    labels = host.split(".")
    if len(labels) > 1 and labels[-1] == "":
        labels.pop()  # one trailing dot, as in a fully qualified name
    if not _NUMERIC_LABEL.fullmatch(labels[-1]):
        return None
    if len(labels) > 4:
        raise ValueError("has more than four parts")
    numbers = [_parse_ipv4_part(label) for label in labels]
    *leading, last = numbers
    if any(n > 255 for n in leading) or last >= 256 ** (5 - len(numbers)):
        raise ValueError("has a part out of range")
    value = last
    for i, n in enumerate(leading):
        value += n << (8 * (3 - i))
    return IPv4Address(value)


def _parse_ipv4_part(label: str) -> int:
    if label[:2] in ("0x", "0X"):
        digits, base = label[2:], 16
    elif len(label) > 1 and label[0] == "0":
        digits, base = label[1:], 8
    else:
        digits, base = label, 10
    if not digits:
        if base == 10:
            raise ValueError("has an empty part")
        return 0  # "0x" and "0" are zero to inet_aton
    try:
        return int(digits, base)
    except ValueError:
        raise ValueError(f"has an invalid part {label!r}") from None


def host_ip(host: str) -> IPAddress | None:
    """The IP address a URL host (brackets optional for IPv6) spells, or None for a name.

    Raises ValueError when it is neither a valid address nor a plausible DNS name.
    """
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if "%" in host:
        raise ValueError("has a zone id (fe80::1%eth0), which is not allowed")
    if ":" in host:
        try:
            return IPv6Address(host)
        except ValueError:
            raise ValueError("is not a valid IPv6 address") from None
    ipv4 = parse_ipv4(host)
    if ipv4 is not None:
        return ipv4
    name = host.lower().removesuffix(".")
    if not name or len(name) > 253 or not all(_DNS_LABEL.fullmatch(p) for p in name.split(".")):
        raise ValueError("is not a DNS name or an IP address")
    return None


def system_resolver(host: str, port: int) -> list[IPAddress]:
    """Every address ``socket.getaddrinfo`` gives for ``host`` (both families)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return unique_addresses(str(info[4][0]) for info in infos)


def unique_addresses(texts: Iterable[str]) -> list[IPAddress]:
    """Parse resolver output into addresses, in order, without repeats (scope ids dropped)."""
    seen: dict[IPAddress, None] = {}
    for text in texts:
        seen.setdefault(ip_address(text.partition("%")[0]), None)
    return list(seen)


def refused_addresses(
    host: str, addresses: Sequence[IPAddress], allow: Sequence[IPNetwork]
) -> str | None:
    """None if every address may be contacted, else a message naming the first refused one."""
    for ip in addresses:
        why = address_refusal(ip, allow)
        if why is not None:
            shown = f"is {ip}" if host_is_literal(host, ip) else f"resolves to {ip}"
            return f"{shown} ({why}); set {ALLOW_ENV} to allow it"
    return None


def host_is_literal(host: str, ip: IPAddress) -> bool:
    """Whether ``host`` spells ``ip`` itself rather than a name resolving to it."""
    try:
        return host_ip(host) == ip
    except ValueError:
        return False


def check_webhook_url(
    url: str,
    allow: Sequence[IPNetwork],
    *,
    field: str = "webhook_url",
    resolve: bool = True,
    resolver: Resolver | None = None,
) -> str:
    """Return ``url`` unchanged if a webhook may be sent to it, else raise InvalidRequest."""
    if not isinstance(url, str):
        raise InvalidRequest(field, "must be a string")
    if len(url) > MAX_URL_LENGTH:
        raise InvalidRequest(field, f"is {len(url)} characters, over the {MAX_URL_LENGTH} limit")
    if not _URL_CHARS.fullmatch(url):
        raise InvalidRequest(
            field,
            "must hold only URL characters: no spaces, control characters, backslashes or "
            "non-ASCII (percent-encode them, write the host in punycode)",
        )
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise InvalidRequest(field, f"is not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise InvalidRequest(field, "must be an http:// or https:// URL")
    if "@" in parts.netloc:
        raise InvalidRequest(field, "must not hold credentials (user:password@): URLs are logged")
    host = parts.netloc
    if host.startswith("["):
        host, bracket, after = host[1:].partition("]")
        if not bracket or (after and not after.startswith(":")):
            raise InvalidRequest(field, "has a malformed [IPv6] host")
    else:
        host = host.partition(":")[0]
    if not host:
        raise InvalidRequest(field, "must name a host")
    try:
        port = parts.port
    except ValueError:
        raise InvalidRequest(field, "has a port that is not a number from 1 to 65535") from None
    if port == 0:
        raise InvalidRequest(field, "has a port that is not a number from 1 to 65535")
    try:
        literal = host_ip(host)
    except ValueError as exc:
        raise InvalidRequest(field, f"host {host!r} {exc}") from None
    if literal is not None:
        addresses = [literal]
    elif not resolve:
        return url
    else:
        try:
            addresses = (resolver or system_resolver)(host.lower(), port or _DEFAULT_PORTS[scheme])
        except (OSError, UnicodeError):
            addresses = []
        if not addresses:
            raise InvalidRequest(field, f"host {host!r} does not resolve")
    refusal = refused_addresses(host, addresses, allow)
    if refusal is not None:
        raise InvalidRequest(field, f"host {host!r} {refusal}")
    return url
