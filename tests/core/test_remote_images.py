"""Image URL fetching: the address policy, the allow-list, and the real fetch path against a
local https server (redirects, caps, timeout, upstream errors, the SSRF check)."""
from __future__ import annotations

import asyncio
import ipaddress
import time

import pytest

from core.config import ImageUrlSettings
from core.errors import BadRequest, ChatVLMError, DeadlineExceeded, PayloadTooLarge
from core.remote_images import ImageFetcher, host_allowed, is_public_address
from tests.image_server import UPSTREAM_SECRET, ImageServer

CAP = 100_000


@pytest.mark.parametrize("ip", [
    "10.0.0.1", "10.255.255.255", "172.16.0.1", "172.31.255.254", "192.168.1.1", "127.0.0.1", "127.8.9.10",
    "::1", "fe80::1", "febf::1", "fc00::1", "fd12:3456::1", "169.254.169.254", "169.254.1.1", "100.64.0.1",
    "100.127.255.254", "100.100.100.200", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254",
    "0.0.0.0", "::", "224.0.0.1", "239.255.255.250", "ff02::1", "255.255.255.255", "240.0.0.1",
    "192.0.0.192", "fd00:ec2::254", "2002:7f00:1::1", "64:ff9b::a00:1", "192.0.2.1", "2001:db8::1",
    "198.18.0.1", "::127.0.0.1", "fec0::1"])
def test_private_and_special_addresses_are_refused(ip):
    assert not is_public_address(ip)
    assert not is_public_address(ipaddress.ip_address(ip))


@pytest.mark.parametrize("ip", ["93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700::1", "2a00:1450:4001::1",
                                "::ffff:93.184.216.34", "64:ff9b::808:808"])
def test_public_addresses_pass(ip):
    assert is_public_address(ip)


def test_garbage_is_not_an_address():
    assert not is_public_address("example.com")


@pytest.mark.parametrize("host,allowed,ok", [
    ("images.example.com", ["images.example.com"], True),
    ("IMAGES.example.com.", ["images.example.com"], True),
    ("evil.images.example.com", ["images.example.com"], False),
    ("a.example.com", ["*.example.com"], True),
    ("a.b.example.com", ["*.example.com"], True),
    ("example.com", ["*.example.com"], False),
    ("badexample.com", ["*.example.com"], False),
    ("example.com.evil.org", ["example.com", "*.example.com"], False),
    ("other.org", ["example.com", "*.other.org"], False),
    ("x.other.org", ["example.com", "*.other.org"], True),
    ("", ["*.example.com"], False),
    ("example.com", [], False),
])
def test_host_allowed(host, allowed, ok):
    assert host_allowed(host, allowed) is ok


# ---- the real fetch path -----------------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    srv = ImageServer().start()
    yield srv
    srv.stop()


def loopback_only(ip) -> bool:
    return str(ip) == "127.0.0.1"


def fetcher(server, *, policy=loopback_only, resolver=True, **settings) -> ImageFetcher:
    settings.setdefault("enabled", True)
    settings.setdefault("allowed_domains", ["img.test", "*.img.test"])
    return ImageFetcher(ImageUrlSettings(**settings), CAP, address_policy=policy, ssl_context=server.client_ssl,
                        resolver=server.resolver() if resolver is True else resolver)


def fetch(f: ImageFetcher, url: str) -> bytes:
    async def go():
        try:
            return await f.fetch(url, param="p")
        finally:
            await f.close()
    return asyncio.run(go())


def refused(f: ImageFetcher, url: str, kind=BadRequest) -> ChatVLMError:
    with pytest.raises(kind) as e:
        fetch(f, url)
    err = e.value
    assert err.param == "p"
    assert UPSTREAM_SECRET not in err.message and "127.0.0.1" not in err.message and "Error" not in err.message
    return err


def test_fetch_success_and_redirects(server):
    assert fetch(fetcher(server), "https://img.test/img.png") == server.image
    assert fetch(fetcher(server), "https://cdn.img.test/chain/2") == server.image  # relative redirects
    to = "https://cdn.img.test/img.png"
    assert fetch(fetcher(server), f"https://img.test/redirect?to={to}") == server.image


def test_fetch_all_fetches_each_url_once(server):
    f = fetcher(server)

    async def go():
        try:
            return await f.fetch_all([("a", "https://img.test/img.png"), ("b", "https://cdn.img.test/img.png"),
                                      ("c", "https://img.test/img.png")])
        finally:
            await f.close()
    got = asyncio.run(go())
    assert got == {"https://img.test/img.png": server.image, "https://cdn.img.test/img.png": server.image}


@pytest.mark.parametrize("url", ["http://img.test/img.png", "ftp://img.test/img.png",
                                 "https://user:pw@img.test/img.png", "https://img.test:8443/img.png",
                                 "https://127.0.0.1/img.png", "https://[::1]/img.png", "https://2130706433/x",
                                 "https://0x7f.1/x", "https://other.test/img.png", "https://img.test.other.test/x"])
def test_refused_before_any_connection(server, url):
    resolver = server.resolver()
    err = refused(fetcher(server, resolver=resolver), url)
    assert err.code == "IMAGE_URL_NOT_ALLOWED"
    assert resolver.asked == []  # nothing was resolved, so nothing was connected to


def test_redirects_are_checked_on_every_hop(server):
    for to in ("https://other.test/img.png", "http://img.test/img.png", "https://127.0.0.1/img.png",
               "https://img.test:444/img.png"):
        err = refused(fetcher(server), f"https://img.test/redirect?to={to}")
        assert err.code == "IMAGE_URL_NOT_ALLOWED" and "redirect" in err.message
    # A hop to an allowed host whose address the policy refuses is refused too.
    resolver = server.resolver({"evil.img.test": ("10.0.0.1", 443)})
    err = refused(fetcher(server, resolver=resolver), "https://img.test/redirect?to=https://evil.img.test/x")
    assert err.code == "IMAGE_URL_NOT_ALLOWED" and resolver.asked == ["img.test", "evil.img.test"]


def test_too_many_redirects(server):
    assert fetch(fetcher(server, max_redirects=3), "https://img.test/chain/3") == server.image
    err = refused(fetcher(server, max_redirects=3), "https://img.test/chain/4")
    assert err.code == "IMAGE_FETCH_FAILED" and "redirected more than 3" in err.message
    assert refused(fetcher(server, max_redirects=0), "https://img.test/chain/1").code == "IMAGE_FETCH_FAILED"


def test_byte_cap(server):
    assert len(fetch(fetcher(server), f"https://img.test/sized/{CAP}")) == CAP
    assert refused(fetcher(server), f"https://img.test/sized/{CAP + 1}", PayloadTooLarge).code == "FILE_TOO_LARGE"
    t0 = time.monotonic()  # refused on the declared length: no waiting for a body that never ends
    assert refused(fetcher(server), "https://img.test/declared-huge", PayloadTooLarge).code == "FILE_TOO_LARGE"
    assert time.monotonic() - t0 < 5
    n = CAP // 16384 + 2  # chunked: no declared length, the streamed bytes pass the cap
    assert refused(fetcher(server), f"https://img.test/chunked/{n}", PayloadTooLarge).code == "FILE_TOO_LARGE"
    assert len(fetch(fetcher(server), "https://img.test/chunked/2")) == 2 * 16384


def test_timeout_covers_the_whole_fetch(server):
    t0 = time.monotonic()
    err = refused(fetcher(server, timeout_s=0.5), "https://img.test/slow", DeadlineExceeded)
    assert err.status_code == 504 and err.code == "IMAGE_FETCH_TIMEOUT"
    assert time.monotonic() - t0 < 3


def test_upstream_errors_are_400_without_upstream_text(server):
    err = refused(fetcher(server), "https://img.test/missing")
    assert err.status_code == 400 and err.code == "IMAGE_FETCH_FAILED" and "404" in err.message
    err = refused(fetcher(server, resolver=server.resolver({"down.img.test": ("127.0.0.1", 1)})),
                  "https://down.img.test/x")
    assert err.code == "IMAGE_FETCH_FAILED"
    assert refused(fetcher(server), "https://nowhere.img.test/x").code == "IMAGE_FETCH_FAILED"  # no DNS answer


def test_untrusted_certificate_fails(server):
    f = ImageFetcher(ImageUrlSettings(enabled=True, allowed_domains=["img.test"]), CAP,
                     address_policy=loopback_only, resolver=server.resolver())  # system CAs only
    assert refused(f, "https://img.test/img.png").code == "IMAGE_FETCH_FAILED"


def test_default_policy_refuses_loopback(server):
    """The SSRF check: an allowed name that resolves to a private address is never connected to."""
    resolver = server.resolver()
    f = ImageFetcher(ImageUrlSettings(enabled=True, allowed_domains=["img.test"]), CAP,
                     ssl_context=server.client_ssl, resolver=resolver)
    err = refused(f, "https://img.test/img.png")
    assert err.code == "IMAGE_URL_NOT_ALLOWED" and "not public" in err.message and resolver.asked == ["img.test"]
    # One public and one private answer: refused as well (every address must be public).
    mixed = MixedResolver()
    f = ImageFetcher(ImageUrlSettings(enabled=True, allowed_domains=["img.test"]), CAP, resolver=mixed)
    assert refused(f, "https://img.test/img.png").code == "IMAGE_URL_NOT_ALLOWED"
    # The production resolver (the system's) on a name that resolves to loopback.
    f = ImageFetcher(ImageUrlSettings(enabled=True, allowed_domains=["localhost"]), CAP)
    assert refused(f, "https://localhost/img.png").code == "IMAGE_URL_NOT_ALLOWED"


class MixedResolver:
    async def resolve(self, host, port=0, family=0):
        import socket
        return [{"hostname": host, "host": a, "port": port, "family": socket.AF_INET, "proto": 0, "flags": 0}
                for a in ("93.184.216.34", "127.0.0.1")]

    async def close(self):
        pass


def test_disabled_fetcher_refuses(server):
    f = ImageFetcher(ImageUrlSettings(), CAP)
    assert refused(f, "https://img.test/img.png").code == "IMAGE_URL_NOT_ALLOWED"
