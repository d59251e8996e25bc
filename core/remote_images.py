"""Opt-in fetching of http(s) image URLs (OpenAI ``image_url`` parts).

This module owns the server-side request forgery guard. A URL is fetched only over https, on
the default port, without user info, from a host name (never a literal address) on the
operator's allow-list. Every host name is resolved by ``_CheckedResolver``, which hands the
connector only addresses that passed the address policy, and refuses the name outright when
any of its addresses fails it: the connection can only go to an address that was checked, so
a second, different DNS answer cannot slip in between the check and the connect. Redirects
are followed by hand, each hop checked like the first URL. One timeout covers the whole fetch,
and the byte cap holds while the body streams. The body is returned as bytes: the image
decoder sniffs the format later, whatever the upstream Content-Type said.

Error messages never carry upstream bodies, exception text or addresses.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from core.config import ImageUrlSettings
from core.errors import BadRequest, DeadlineExceeded, PayloadTooLarge

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
AddressPolicy = Callable[[IpAddress], bool]

MAX_URL_CHARS = 8192
_CHUNK = 64 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})

# Cloud metadata endpoints. Each already falls in a refused range; listed so that a change of
# the ranges can never let one through.
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "169.254.169.253", "100.100.100.200", "192.0.0.192",
    "fd00:ec2::254", "fd00:ec2::23"))
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def is_public_address(ip: IpAddress | str) -> bool:
    """True when ``ip`` is a globally routable unicast address (the default address policy)."""
    try:
        addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address):
        addr = ipaddress.IPv6Address(addr.compressed.split("%", 1)[0]) if addr.scope_id else addr
        # IPv6 forms that carry an IPv4 address: judge the IPv4 address they reach.
        embedded = addr.ipv4_mapped or addr.sixtofour
        if embedded is None and addr in _NAT64:
            embedded = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public_address(embedded)
        if addr.is_site_local:
            return False
    if addr in METADATA_ADDRESSES:
        return False
    if isinstance(addr, ipaddress.IPv4Address) and addr in _CGNAT:
        return False
    if (addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_multicast or addr.is_reserved
            or addr.is_unspecified):
        return False
    return addr.is_global


def host_allowed(host: str, allowed: Iterable[str]) -> bool:
    """True when ``host`` is on the allow-list: an exact name, or a subdomain of a "*.domain" entry."""
    host = host.lower().rstrip(".")
    if not host:
        return False
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if entry.startswith("*."):
            if host.endswith(entry[1:]) and len(host) > len(entry) - 1:
                return True
        elif host == entry:
            return True
    return False


class AddressRefused(OSError):
    """A host name resolved to an address the policy refuses (raised inside the connector)."""


class _CheckedResolver(AbstractResolver):
    """Resolves with ``inner``, then returns the addresses only when every one passes ``policy``."""

    def __init__(self, inner: AbstractResolver, policy: AddressPolicy) -> None:
        self._inner = inner
        self._policy = policy

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if not results:
            raise OSError("no addresses")
        for result in results:
            try:
                addr = ipaddress.ip_address(result["host"])
            except ValueError:
                raise AddressRefused("unparsable address") from None
            if not self._policy(addr):
                raise AddressRefused("address refused by policy")
        return results

    async def close(self) -> None:
        await self._inner.close()


def _refused(param: str, message: str) -> BadRequest:
    return BadRequest(message, param=param, code="IMAGE_URL_NOT_ALLOWED")


def _failed(param: str, message: str) -> BadRequest:
    return BadRequest(message, param=param, code="IMAGE_FETCH_FAILED")


class ImageFetcher:
    """Fetches allowed https image URLs over one lazily created, reused client session.

    ``address_policy``, ``ssl_context`` and ``resolver`` let tests run the real fetch path
    against a local server; production code leaves them at their defaults."""

    def __init__(self, settings: ImageUrlSettings, max_bytes: int, *,
                 address_policy: AddressPolicy = is_public_address, ssl_context: ssl.SSLContext | None = None,
                 resolver: AbstractResolver | None = None) -> None:
        self.settings = settings
        self.max_bytes = max_bytes
        self._policy = address_policy
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._resolver = resolver
        self._session: aiohttp.ClientSession | None = None

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            inner = self._resolver if self._resolver is not None else aiohttp.ThreadedResolver()
            connector = aiohttp.TCPConnector(resolver=_CheckedResolver(inner, self._policy), use_dns_cache=False,
                                             ssl=self._ssl, limit=32)
            # No proxies from the environment, no cookies kept between fetches, bodies as sent.
            self._session = aiohttp.ClientSession(connector=connector, trust_env=False,
                                                  cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False)
        return self._session

    async def close(self) -> None:
        """Close the client session (app shutdown)."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def check_url(self, url: URL | str, *, param: str, redirect: bool = False) -> URL:
        """The parsed URL when policy allows fetching it; else 400 IMAGE_URL_NOT_ALLOWED."""
        where = "the image URL redirects to a URL that" if redirect else "the image URL"
        if isinstance(url, str):
            if len(url) > MAX_URL_CHARS:
                raise BadRequest(f"image URL is longer than {MAX_URL_CHARS} characters", param=param,
                                 code="INVALID_IMAGE_URL")
            try:
                url = URL(url.strip())
            except (ValueError, TypeError):
                raise BadRequest("image URL is not a valid URL", param=param, code="INVALID_IMAGE_URL") from None
        if url.scheme != "https":
            raise _refused(param, f"{where} is not https; only https image URLs are fetched")
        host = url.raw_host or ""
        if url.raw_user is not None or url.raw_password is not None:
            raise _refused(param, "image URLs with user info (user:password@) are not fetched")
        if url.explicit_port is not None and url.explicit_port != 443:
            raise _refused(param, f"{where} names a port other than 443")
        if not host:
            raise BadRequest("image URL has no host", param=param, code="INVALID_IMAGE_URL")
        if _is_ip_literal(host):
            raise _refused(param, f"{where} names an IP address; image URLs must name an allowed host")
        if not host_allowed(host, self.settings.allowed_domains):
            raise _refused(param, f"{where} names a host that is not on this server's image URL allow-list")
        return url

    async def fetch(self, url: str, *, param: str) -> bytes:
        """The body of an allowed https image URL, redirects followed and each hop checked."""
        if not self.settings.enabled:
            raise _refused(param, "image URLs (http/https) are not enabled on this server")
        target = self.check_url(url, param=param)
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                return await self._fetch(target, param)
        except TimeoutError:
            raise DeadlineExceeded(f"fetching the image URL took longer than {self.settings.timeout_s:g} s",
                                   param=param, code="IMAGE_FETCH_TIMEOUT") from None

    async def fetch_all(self, urls: Iterable[tuple[str, str]]) -> dict[str, bytes]:
        """Fetch (param, url) pairs concurrently, each distinct URL once: url -> bytes. The first
        failure cancels the other fetches and is raised."""
        first: dict[str, str] = {}
        for param, url in urls:
            first.setdefault(url, param)
        if not first:
            return {}
        tasks = {url: asyncio.ensure_future(self.fetch(url, param=param)) for url, param in first.items()}
        try:
            await asyncio.gather(*tasks.values())
        except BaseException:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            raise
        return {url: task.result() for url, task in tasks.items()}

    async def _fetch(self, url: URL, param: str) -> bytes:
        session = self._client()
        for hop in range(self.settings.max_redirects + 1):
            try:
                async with session.get(url, allow_redirects=False, headers=_HEADERS) as resp:
                    if resp.status in _REDIRECTS:
                        location = resp.headers.get("Location")
                        if not location:
                            raise _failed(param, "the image URL answered a redirect without a location")
                        try:
                            url = self.check_url(url.join(URL(location)), param=param, redirect=True)
                        except ValueError:
                            raise _failed(param, "the image URL redirected to an invalid URL") from None
                        continue
                    if not 200 <= resp.status < 300:
                        raise _failed(param, f"the image URL answered HTTP {resp.status}")
                    return await self._read(resp, param)
            except AddressRefused:
                raise _refused(param, "image URL host resolves to an address that is not public") from None
            except aiohttp.ClientConnectorError as exc:
                if _caused_by(exc, AddressRefused):
                    raise _refused(param, "image URL host resolves to an address that is not public") from None
                if isinstance(exc, aiohttp.ClientConnectorDNSError):
                    raise _failed(param, "the image URL host could not be resolved") from None
                raise _failed(param, "could not connect to the image URL host") from None
            except (aiohttp.ClientError, OSError, ssl.SSLError):
                raise _failed(param, "fetching the image URL failed") from None
        raise _failed(param, f"the image URL redirected more than {self.settings.max_redirects} times")

    async def _read(self, resp: aiohttp.ClientResponse, param: str) -> bytes:
        too_large = PayloadTooLarge(f"image is larger than {self.max_bytes / 2**20:g} MB", param=param,
                                    code="FILE_TOO_LARGE")
        if resp.content_length is not None and resp.content_length > self.max_bytes:
            raise too_large
        body = bytearray()
        async for chunk in resp.content.iter_chunked(_CHUNK):
            body += chunk
            if len(body) > self.max_bytes:
                raise too_large
        if not body:
            raise _failed(param, "the image URL answered an empty body")
        return bytes(body)


_HEADERS = {"Accept": "image/*", "Accept-Encoding": "identity", "User-Agent": "chatvlm-image-fetcher"}


def _is_ip_literal(host: str) -> bool:
    candidate = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(candidate.split("%", 1)[0])
        return True
    except ValueError:
        pass
    # Legacy numeric IPv4 forms ("2130706433", "0x7f.1", "127.1") are addresses too.
    labels = candidate.rstrip(".").split(".")
    return all(_numeric(label) for label in labels)


def _numeric(label: str) -> bool:
    text = label.lower()
    if text.startswith("0x"):
        return len(text) > 2 and all(c in "0123456789abcdef" for c in text[2:])
    return text.isdigit()


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: Any = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, kind) or isinstance(getattr(seen, "os_error", None), kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
