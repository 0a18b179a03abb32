"""The SSRF guard for webhook URLs: refused at submit time, and again at connect time."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Network, ip_address, ip_network
from pathlib import Path

import httpx
import pytest

from shared.schemas import InvalidRequest
from shared.settings import Settings
from shared.webhook_urls import IPAddress, address_refusal, check_webhook_url, parse_ipv4
from worker.webhook_transport import WebhookAddressRefused, guarded_client

LOOPBACK = (IPv4Network("127.0.0.0/8"),)


def no_dns(host: str, port: int) -> list[IPAddress]:
    raise AssertionError(f"an IP literal must not be resolved, but {host!r} was")


def answers(*ips: str) -> object:
    """A submit-time resolver that answers ``ips`` for every name."""

    def resolve(host: str, port: int) -> list[IPAddress]:
        return [ip_address(ip) for ip in ips]

    return resolve


# --- submit time ----------------------------------------------------------------------------

REFUSED = [
    # loopback, in every spelling
    ("http://127.0.0.1/hook", "loopback"),
    ("http://127.1/", "loopback"),
    ("http://0x7f000001/", "loopback"),
    ("http://2130706433/", "loopback"),
    ("http://017700000001/", "loopback"),
    ("http://0177.0.0.1/", "loopback"),
    ("http://0x7f.1/", "loopback"),
    ("http://127.0.0.1./", "loopback"),
    ("http://127.255.255.254:8080/", "loopback"),
    ("http://[::1]/", "loopback"),
    ("http://[::ffff:127.0.0.1]/", "loopback"),
    ("http://[0:0:0:0:0:ffff:7f00:1]/", "loopback"),
    ("http://[::127.0.0.1]/", "IPv4-compatible"),
    ("http://localhost/", "resolves to 127.0.0.1 (loopback)"),
    # private, link-local, CGNAT and the rest of the special-purpose ranges
    ("http://10.0.0.5/", "private"),
    ("http://172.16.0.1/", "private"),
    ("http://172.31.255.255/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://[::ffff:10.0.0.1]/", "private"),
    ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
    ("http://169.254.1.1/", "link-local"),
    ("http://100.64.0.1/", "CGNAT"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://0/", "unspecified"),
    ("http://0.1.2.3/", "this network"),
    ("http://255.255.255.255/", "broadcast"),
    ("http://224.0.0.1/", "multicast"),
    ("http://239.255.255.250/", "multicast"),
    ("http://240.0.0.1/", "reserved"),
    ("http://192.0.2.1/", "documentation"),
    ("http://203.0.113.9/", "documentation"),
    ("http://198.18.0.1/", "benchmarking"),
    ("http://[fc00::1]/", "unique-local"),
    ("http://[fd12::1]/", "unique-local"),
    ("http://[fe80::1]/", "link-local"),
    ("http://[fe80::1%25eth0]/", "zone id"),
    ("http://[ff02::1]/", "multicast"),
    ("http://[::]/", "unspecified"),
    ("http://[2001:db8::1]/", "documentation"),
    # IPv6 that carries an IPv4 address inside
    ("http://[2002:7f00:1::]/", "6to4 IPv6 embedding 127.0.0.1 (loopback)"),
    ("http://[64:ff9b::7f00:1]/", "NAT64 IPv6 embedding 127.0.0.1 (loopback)"),
    ("http://[64:ff9b::a00:5]/", "NAT64 IPv6 embedding 10.0.0.5 (private)"),
    ("http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/", "Teredo"),
    # not http(s), or not a well-formed URL
    ("ftp://8.8.8.8/", "http:// or https://"),
    ("file:///etc/passwd", "http:// or https://"),
    ("javascript:alert(1)", "http:// or https://"),
    ("gopher://8.8.8.8:70/", "http:// or https://"),
    ("http:///hook", "must name a host"),
    ("http://:8080/hook", "must name a host"),
    ("http://user:pw@8.8.8.8/", "credentials"),
    ("http://8.8.8.8@127.0.0.1/", "credentials"),
    ("http://8.8.8.8:0/", "port"),
    ("http://8.8.8.8:65536/", "port"),
    ("http://8.8.8.8:http/", "port"),
    ("http://8.8.8.8/a b", "spaces"),
    ("http://8.8.8.8/\n", "control characters"),
    ("\thttp://127.0.0.1/", "control characters"),
    ("http://8.8.8.8\\@127.0.0.1/", "backslashes"),
    ("http://\uff11\uff12\uff17.\uff10.\uff10.\uff11/", "non-ASCII"),
    ("http://1.2.3.256/", "part out of range"),
    ("http://08.0.0.1/", "invalid part"),
    ("http://1.2.3.4.5/", "more than four parts"),
    ("http://[::1/", "not a valid URL"),
    ("http://[1.2.3.4]/", "not a valid"),
    ("http://hooks!.example/", "not a DNS name"),
    ("http://" + "a" * 2048 + ".example/", "over the 2048 limit"),
]

ACCEPTED = [
    "http://8.8.8.8/",
    "https://93.184.215.14/hook?attempt=1#frag",
    "https://[2606:4700::1111]/",
    "http://8.8.8.8:8080/path",
    "HTTPS://8.8.8.8/",
    "http://134744072/",  # 8.8.8.8 as one number: an odd spelling, but a public address
    "http://[::ffff:8.8.8.8]/",
    "http://[2002:808:808::1]/",  # 6to4 around 8.8.8.8
    "http://[64:ff9b::808:808]/",  # NAT64 around 8.8.8.8
]


@pytest.mark.parametrize(("url", "rule"), REFUSED)
def test_refused_urls_name_the_rule(url: str, rule: str) -> None:
    # Given no allow-list, when the URL is checked at submit time, then it is refused.
    resolver = None if "localhost" in url else no_dns
    with pytest.raises(InvalidRequest) as caught:
        check_webhook_url(url, (), resolver=resolver)  # type: ignore[arg-type]
    assert caught.value.field == "webhook_url"
    assert rule in caught.value.rule


@pytest.mark.parametrize("url", ACCEPTED)
def test_global_ip_literals_are_accepted_without_dns(url: str) -> None:
    # Given a URL naming a globally routable address, then it is accepted as given, unresolved.
    assert check_webhook_url(url, (), resolver=no_dns) == url


def test_a_name_resolving_to_a_private_address_is_refused_with_advice() -> None:
    # Given a name resolving to 10.0.0.5, when checked, then the error names it and the setting.
    with pytest.raises(InvalidRequest) as caught:
        check_webhook_url(
            "https://hooks.example/llm",
            (),
            field="[3].webhook_url",
            resolver=answers("10.0.0.5"),  # type: ignore[arg-type]
        )
    assert caught.value.field == "[3].webhook_url"
    assert "resolves to 10.0.0.5 (private)" in caught.value.rule
    assert "BATCHBRIDGE_WEBHOOK_ALLOW_CIDRS" in caught.value.rule


def test_one_private_address_among_public_ones_is_enough_to_refuse() -> None:
    with pytest.raises(InvalidRequest, match=r"resolves to fd00::5 \(unique-local\)"):
        check_webhook_url(
            "https://hooks.example/",
            (),
            resolver=answers("93.184.215.14", "2606:4700::1111", "fd00::5"),  # type: ignore[arg-type]
        )


def test_a_name_resolving_to_public_addresses_only_is_accepted() -> None:
    url = "https://hooks.example/llm"
    resolver = answers("93.184.215.14", "2606:4700::1111")
    assert check_webhook_url(url, (), resolver=resolver) == url  # type: ignore[arg-type]


def test_a_name_that_does_not_resolve_is_refused() -> None:
    def nxdomain(host: str, port: int) -> list[IPAddress]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(InvalidRequest, match=r"'nowhere\.example' does not resolve"):
        check_webhook_url("http://nowhere.example/", (), resolver=nxdomain)


def test_resolver_is_asked_with_the_url_port_or_the_scheme_default() -> None:
    asked: list[tuple[str, int]] = []

    def record(host: str, port: int) -> list[IPAddress]:
        asked.append((host, port))
        return [ip_address("8.8.8.8")]

    for url in ("http://a.example/", "https://b.example/", "https://C.example:8443/"):
        check_webhook_url(url, (), resolver=record)
    assert asked == [("a.example", 80), ("b.example", 443), ("c.example", 8443)]


def test_resolve_false_skips_dns_for_names_but_not_for_literals() -> None:
    # Given resolve=False, a name passes unresolved, while a private literal is still refused.
    assert check_webhook_url("http://hooks.example/", (), resolve=False, resolver=no_dns)
    with pytest.raises(InvalidRequest, match="private"):
        check_webhook_url("http://10.1.2.3/", (), resolve=False)


def test_a_non_string_url_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="must be a string"):
        check_webhook_url(b"http://8.8.8.8/", ())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "accepted"),
    [
        ("http://127.0.0.1:9/hook", True),
        ("http://0x7f000001/", True),
        ("http://[::ffff:127.0.0.1]/", True),
        ("http://10.0.0.5/", False),
        ("http://[::1]/", False),
        ("http://[2002:7f00:1::]/", False),  # the allow-list opens addresses, not tunnels
        ("http://169.254.169.254/", False),
    ],
)
def test_allow_list_opens_only_the_ranges_it_names(url: str, accepted: bool) -> None:
    # Given 127.0.0.0/8 allowed, then loopback v4 (however spelt) passes and nothing else does.
    if accepted:
        assert check_webhook_url(url, LOOPBACK, resolver=no_dns) == url
    else:
        with pytest.raises(InvalidRequest):
            check_webhook_url(url, LOOPBACK, resolver=no_dns)


def test_allow_list_from_the_environment_reaches_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("BATCHBRIDGE_WEBHOOK_ALLOW_CIDRS", "127.0.0.0/8, fd00::/8")
    allow = Settings.load(data_dir=tmp_path).webhook_allow_cidrs
    assert address_refusal(ip_address("127.0.0.1"), allow) is None
    assert address_refusal(ip_address("fd00::1"), allow) is None
    assert address_refusal(ip_address("10.0.0.1"), allow) == "private"


@pytest.mark.parametrize(
    "host",
    ["127.1", "0x7f000001", "2130706433", "017700000001", "0177.0.0.1", "0x7f.1", "0x7F.0.0.01",
     "10.1", "192.168.257", "1.2.3.4", "0", "4294967295", "1.2.3.4."],
)  # fmt: skip
def test_numeric_hosts_read_as_inet_aton_reads_them(host: str) -> None:
    # Given an odd IPv4 spelling, then the guard reads the same address the C library would.
    expected = socket.inet_ntoa(socket.inet_aton(host.removesuffix(".")))
    assert str(parse_ipv4(host)) == expected


def test_is_global_alone_would_let_multicast_and_tunnels_through() -> None:
    # Python 3.11 calls these global; the guard must not.
    for text in ("224.0.0.1", "ff02::1", "2002:7f00:1::", "64:ff9b::7f00:1"):
        ip = ip_address(text)
        assert address_refusal(ip, ()) is not None, text
    assert address_refusal(ip_address("10.0.0.1"), (ip_network("10.0.0.0/8"),)) is None


# --- connect time ---------------------------------------------------------------------------


@dataclass
class Seen:
    """One request a receiver got."""

    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A real HTTP server on 127.0.0.1 that records what reaches it."""

    port: int
    seen: list[Seen] = field(default_factory=list)
    redirect_to: str | None = None
    sni: list[str | None] = field(default_factory=list)


def _serve(tls: ssl.SSLContext | None = None) -> Iterator[Receiver]:
    receiver: Receiver

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            receiver.seen.append(Seen(self.path, dict(self.headers.items()), body))
            if receiver.redirect_to:
                self.send_response(302)
                self.send_header("Location", receiver.redirect_to)
            else:
                self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver = Receiver(server.server_address[1])
    if tls is not None:
        tls.sni_callback = lambda sock, name, ctx: receiver.sni.append(name)  # type: ignore[assignment,misc]
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    yield from _serve()


@pytest.fixture
def other_receiver() -> Iterator[Receiver]:
    yield from _serve()


def hook_settings(tmp_path: Path, *allow: str) -> Settings:
    return Settings.load(data_dir=tmp_path, webhook_allow_cidrs=allow, webhook_timeout_seconds=5)


def async_answers(*ips: str) -> object:
    """A connect-time resolver answering ``ips`` for every name."""

    async def resolve(host: str, port: int) -> list[IPAddress]:
        return [ip_address(ip) for ip in ips]

    return resolve


def post(settings: Settings, url: str, resolver: object = None, **kw: object) -> httpx.Response:
    async def send() -> httpx.Response:
        async with guarded_client(settings, resolver=resolver, **kw) as client:  # type: ignore[arg-type]
            return await client.post(url, content=b'{"type":"request.completed"}')

    return asyncio.run(send())


def test_allowed_loopback_receives_the_post(receiver: Receiver, tmp_path: Path) -> None:
    # Given 127.0.0.0/8 allowed, when a webhook is posted to 127.0.0.1, then it arrives.
    response = post(hook_settings(tmp_path, "127.0.0.0/8"), f"http://127.0.0.1:{receiver.port}/h")
    assert response.status_code == 200
    assert [(s.path, s.body) for s in receiver.seen] == [("/h", b'{"type":"request.completed"}')]
    assert receiver.seen[0].headers["User-Agent"].startswith("batchbridge-webhooks/")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1", "0x7f000001", "[::ffff:127.0.0.1]"])
def test_loopback_is_refused_at_connect_time_without_the_allow_list(
    receiver: Receiver, tmp_path: Path, host: str
) -> None:
    # Given no allow-list (and no submit-time check), then the client will not connect at all.
    with pytest.raises(WebhookAddressRefused, match="loopback"):
        post(hook_settings(tmp_path), f"http://{host}:{receiver.port}/h")
    assert receiver.seen == []


def test_a_name_resolved_by_the_system_is_vetted_too(receiver: Receiver, tmp_path: Path) -> None:
    with pytest.raises(WebhookAddressRefused, match=r"resolves to 127\.0\.0\.1"):
        post(hook_settings(tmp_path), f"http://localhost:{receiver.port}/h")
    assert receiver.seen == []


def test_dns_rebinding_after_submit_is_refused_at_connect(
    receiver: Receiver, tmp_path: Path
) -> None:
    # Given a name that answers a public address first and loopback afterwards (rebinding).
    answers_given = iter(["93.184.215.14", "127.0.0.1"])

    def first_lookup(host: str, port: int) -> list[IPAddress]:
        return [ip_address(next(answers_given))]

    async def later_lookup(host: str, port: int) -> list[IPAddress]:
        return [ip_address(next(answers_given))]

    url = f"http://rebind.example:{receiver.port}/h"
    # When submitted, it passes; when sent, the second answer is refused before connecting.
    assert check_webhook_url(url, (), resolver=first_lookup) == url
    with pytest.raises(WebhookAddressRefused, match=r"resolves to 127\.0\.0\.1 \(loopback\)"):
        post(hook_settings(tmp_path), url, resolver=later_lookup)
    assert receiver.seen == []


@pytest.mark.parametrize("location", ["http://10.0.0.1/", "http://127.0.0.1:{port}/again"])
def test_redirects_are_not_followed(
    receiver: Receiver, other_receiver: Receiver, tmp_path: Path, location: str
) -> None:
    # Given a receiver answering 302 to a private address (or to a second local server).
    receiver.redirect_to = location.format(port=other_receiver.port)
    response = post(hook_settings(tmp_path, "127.0.0.0/8"), f"http://127.0.0.1:{receiver.port}/")
    # Then the 302 comes back and nothing else was contacted.
    assert response.status_code == 302
    assert len(receiver.seen) == 1 and other_receiver.seen == []


def test_the_host_header_keeps_the_name_while_the_vetted_ip_is_dialled(
    receiver: Receiver, tmp_path: Path
) -> None:
    resolver = async_answers("127.0.0.1")
    settings = hook_settings(tmp_path, "127.0.0.0/8")
    response = post(settings, f"http://hooks.example:{receiver.port}/h", resolver=resolver)
    assert response.status_code == 200
    assert receiver.seen[0].headers["Host"] == f"hooks.example:{receiver.port}"


def test_later_addresses_are_tried_when_the_first_refuses_connections(
    receiver: Receiver, tmp_path: Path
) -> None:
    # Given a name resolving to 127.0.0.2 (nothing listens there) and then 127.0.0.1.
    resolver = async_answers("127.0.0.2", "127.0.0.1")
    settings = hook_settings(tmp_path, "127.0.0.0/8")
    response = post(settings, f"http://hooks.example:{receiver.port}/h", resolver=resolver)
    assert response.status_code == 200 and len(receiver.seen) == 1


def test_a_name_that_does_not_resolve_is_a_connect_error(tmp_path: Path) -> None:
    async def nxdomain(host: str, port: int) -> list[IPAddress]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(httpx.ConnectError, match="does not resolve"):
        post(hook_settings(tmp_path), "http://nowhere.example/", resolver=nxdomain)


def test_proxies_from_the_environment_are_ignored(
    receiver: Receiver, other_receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given HTTP(S)_PROXY pointing at another server, the webhook still goes straight out.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{other_receiver.port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    response = post(hook_settings(tmp_path, "127.0.0.0/8"), f"http://127.0.0.1:{receiver.port}/")
    assert response.status_code == 200
    assert len(receiver.seen) == 1 and other_receiver.seen == []


@pytest.fixture
def hooks_example_cert(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for hooks.example, made with the openssl CLI."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", "/CN=hooks.example",
         "-addext", "subjectAltName=DNS:hooks.example",
         "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def test_tls_uses_the_name_for_sni_and_the_certificate_check(
    hooks_example_cert: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, key = hooks_example_cert
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    trust = ssl.create_default_context(cafile=str(cert))
    settings = hook_settings(tmp_path, "127.0.0.0/8")
    served = _serve(server_tls)
    tls_receiver = next(served)
    try:
        # When posted by name to a vetted 127.0.0.1, the server sees the name in SNI.
        url = f"https://hooks.example:{tls_receiver.port}/h"
        response = post(settings, url, async_answers("127.0.0.1"), ssl_context=trust)
        assert response.status_code == 200
        assert tls_receiver.sni == ["hooks.example"]
        # And the certificate is still checked: by IP, the hooks.example certificate fails.
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            post(settings, f"https://127.0.0.1:{tls_receiver.port}/h", ssl_context=trust)
        assert len(tls_receiver.seen) == 1
    finally:
        served.close()
