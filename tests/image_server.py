"""A real https image server on 127.0.0.1 for the image-URL tests, with a throwaway CA (trustme).

It runs on its own event loop in a thread. Fetchers under test reach it through
``MapResolver``, which answers the test host names with 127.0.0.1 and the server's port, so
the URLs keep the default https port the fetcher insists on (https://img.test/...).
"""
from __future__ import annotations

import asyncio
import io
import socket
import ssl
import threading

import trustme
from aiohttp import web
from aiohttp.abc import AbstractResolver
from PIL import Image

HOSTS = ("img.test", "cdn.img.test", "other.test")
UPSTREAM_SECRET = "upstream-secret-body 10.1.2.3"


def png(w: int = 8, h: int = 6) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), "red").save(buf, "PNG")
    return buf.getvalue()


class MapResolver(AbstractResolver):
    """Host name -> (address, port); the port replaces the requested one (443)."""

    def __init__(self, table: dict[str, tuple[str, int]]) -> None:
        self.table = table
        self.asked: list[str] = []

    async def resolve(self, host, port=0, family=socket.AF_INET):
        self.asked.append(host)
        if host not in self.table:
            raise OSError(f"unknown test host {host}")
        addr, real_port = self.table[host]
        return [{"hostname": host, "host": addr, "port": real_port, "family": socket.AF_INET, "proto": 0,
                 "flags": socket.AI_NUMERICHOST}]

    async def close(self) -> None:
        pass


def _routes(image: bytes) -> web.Application:
    async def img(request):
        return web.Response(body=image, content_type="text/plain")  # the type is not trusted anyway

    async def redirect(request):
        raise web.HTTPFound(request.query["to"])

    async def chain(request):
        n = int(request.match_info["n"])
        if n == 0:
            return web.Response(body=image)
        raise web.HTTPFound(f"/chain/{n - 1}")

    async def sized(request):
        return web.Response(body=b"\0" * int(request.match_info["n"]))

    async def declared_huge(request):
        resp = web.StreamResponse()
        resp.content_length = 10**9
        await resp.prepare(request)
        await resp.write(b"\0" * 1024)
        await asyncio.sleep(30)  # never finishes: the client must refuse on the header alone
        return resp

    async def chunked(request):
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(int(request.match_info["n"])):
            await resp.write(b"\0" * 16384)
        await resp.write_eof()
        return resp

    async def slow(request):
        await asyncio.sleep(30)
        return web.Response(body=image)

    async def missing(request):
        return web.Response(status=404, text=UPSTREAM_SECRET)

    app = web.Application()
    app.add_routes([web.get("/img.png", img), web.get("/redirect", redirect), web.get("/chain/{n}", chain),
                    web.get("/sized/{n}", sized), web.get("/declared-huge", declared_huge),
                    web.get("/chunked/{n}", chunked), web.get("/slow", slow), web.get("/missing", missing)])
    return app


class ImageServer:
    """Start with ``start()``; ``client_ssl`` trusts its CA; ``resolver()`` maps HOSTS to it."""

    def __init__(self) -> None:
        self.ca = trustme.CA()
        self.image = png()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def client_ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx

    def resolver(self, extra: dict[str, tuple[str, int]] | None = None) -> MapResolver:
        return MapResolver({**{h: ("127.0.0.1", self.port) for h in HOSTS}, **(extra or {})})

    def start(self) -> "ImageServer":
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert(*HOSTS).configure_cert(server_ctx)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(server_ctx), self._loop).result(10)
        return self

    async def _start(self, server_ctx: ssl.SSLContext) -> None:
        self._runner = web.AppRunner(_routes(self.image), shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=server_ctx)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def stop(self) -> None:
        if self._runner is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(5)
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass
        asyncio.run_coroutine_threadsafe(self._cancel_rest(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    @staticmethod
    async def _cancel_rest() -> None:
        """End the handlers still sleeping (the slow and never-ending routes)."""
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)
