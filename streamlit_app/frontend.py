"""How the app server hands Streamlit's front end to a browser: the two fixes behind `streamlit run
streamlit_app/app.py` (the launcher), both measured in a real browser on 2 cores (docs/speed.md).

- ``FrontEndMiddleware`` (an ASGI middleware for ``st.App``):
  * a module page opened at its own address (a new tab, a bookmark, a reload) gets Streamlit's page shell with
    the server's base address written into it (``window.__streamlit.BACKEND_BASE_URL``, which the front end
    reads for embedding). Without it the front end first asks for ``/<page>/_stcore/health`` and
    ``/_stcore/host-config`` under the page's own address, is refused, and asks again at the parent address
    after a fixed 100 ms (Streamlit 1.67's connection start; 0.08-0.25 s from the refusal to the retry in
    browser traces on 2 cores).
    The address given is that parent address, the one Streamlit would reach itself, so a server behind a
    proxy path prefix is found as before.
  * Streamlit's own front-end files (``/static/...``: hashed, immutable) are answered from the installed
    package directly, in one write each, without Streamlit's per-request stack (session cookie, gzip
    selection, a file read in worker threads); about 60 of them are fetched when a page first opens. Only
    exact names of files present in the package at start are answered; everything else goes to Streamlit.
  Together, in 42 new tabs each alternated between two servers: 1.03 s to a module page's uploader against
  1.13 s with Home.py started directly; without the second part 1.11 against 1.02 s (another such run).
- ``enable_tcp_nodelay``: Nagle's algorithm off for the server's connections (see its docstring).

Anything the middleware does not recognise (another path, another method, websockets) passes to Streamlit
unchanged; if Streamlit's static layout changes, it answers nothing itself and the app works as shipped."""
from __future__ import annotations

import mimetypes
import socket
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from pathlib import Path
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# The script strips the page's own segment from the address the browser shows: what remains is the server's
# base address (with any proxy prefix), where Streamlit's health check, host config and websocket answer.
BASE_ADDRESS_SCRIPT = (
    '<script>(function(){var p=location.pathname.replace(/\\/+$/,"");'
    'window.__streamlit=Object.assign({},window.__streamlit,'
    '{BACKEND_BASE_URL:location.origin+p.slice(0,p.lastIndexOf("/")+1)});})()</script>')

_IMMUTABLE = b"public, immutable, max-age=31536000"
_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".woff2": "font/woff2",
          ".woff": "font/woff", ".ttf": "font/ttf", ".svg": "image/svg+xml", ".png": "image/png",
          ".json": "application/json"}


def streamlit_static_dir() -> Path:
    """The installed Streamlit's front-end directory (index.html, static/)."""
    import streamlit

    return Path(streamlit.__file__).resolve().parent / "static"


def page_url_names(pages_dir: Path) -> frozenset[str]:
    """The URL names Streamlit gives the scripts in ``pages_dir`` ("1_Pneumonia.py" -> "Pneumonia")."""
    from streamlit.source_util import page_icon_and_name

    return frozenset(name for p in sorted(Path(pages_dir).glob("*.py"))
                     if (name := page_icon_and_name(p)[1]))


def page_shell(index_html: str) -> bytes:
    """Streamlit's index.html with ``BASE_ADDRESS_SCRIPT`` first in its head (before the front end's module
    script reads ``window.__streamlit``). Raises ValueError if the page has no ``<head>``."""
    if "<head>" not in index_html:
        raise ValueError("Streamlit's index.html has no <head>: its layout changed")
    return index_html.replace("<head>", "<head>" + BASE_ADDRESS_SCRIPT, 1).encode()


def static_files(static_dir: Path) -> dict[str, tuple[Path, str]]:
    """``/static/<relative path>`` -> (file, content type) for every front-end file of a type in ``_TYPES``."""
    root = Path(static_dir) / "static"
    out: dict[str, tuple[Path, str]] = {}
    for p in root.rglob("*") if root.is_dir() else ():
        ctype = _TYPES.get(p.suffix) or mimetypes.guess_type(p.name)[0]
        if ctype and p.is_file():
            out["/static/" + p.relative_to(root).as_posix()] = (p, ctype)
    return out


class FrontEndMiddleware:
    """ASGI middleware in front of Streamlit (``st.App(middleware=[Middleware(FrontEndMiddleware, ...)])``).

    ``pages``: the URL names of the module pages (``page_url_names``); ``static_dir``: Streamlit's front-end
    directory (default: the installed package's); ``base_path``: returns the server's ``server.baseUrlPath``
    (read per request, since the command line sets it after the launcher is imported)."""

    def __init__(self, app: ASGIApp, pages: Iterable[str], static_dir: Path | None = None,
                 base_path: Callable[[], str] | None = None) -> None:
        self.app = app
        self.pages = frozenset(pages)
        if not self.pages or any(not p or "/" in p for p in self.pages):
            raise ValueError(f"pages must be non-empty URL names without '/', got {sorted(self.pages)}")
        static_dir = Path(static_dir) if static_dir is not None else streamlit_static_dir()
        index = static_dir / "index.html"
        try:
            self.shell: bytes | None = page_shell(index.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # another Streamlit layout: leave the pages to Streamlit
            self.shell = None
        self.files = static_files(static_dir)
        self.base_path = base_path or _configured_base_path

    def _local_path(self, path: str) -> str | None:
        """``path`` relative to the server's base URL path, or None if it lies outside it."""
        base = self.base_path().strip("/")
        if not base:
            return path
        prefix = "/" + base
        if path == prefix or path.startswith(prefix + "/"):
            return path[len(prefix):] or "/"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") in ("GET", "HEAD"):
            path = self._local_path(scope.get("path", ""))
            answer = self._answer(path) if path is not None else None
            if answer is not None:
                body, ctype, cache = answer
                await send({"type": "http.response.start", "status": 200, "headers": [
                    (b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode()),
                    (b"cache-control", cache)]})
                await send({"type": "http.response.body", "body": body if scope["method"] == "GET" else b""})
                return
        await self.app(scope, receive, send)

    def _answer(self, path: str) -> tuple[bytes, str, bytes] | None:
        if self.shell is not None and path.startswith("/") and path[1:] in self.pages:
            return self.shell, "text/html; charset=utf-8", b"no-cache"
        hit = self.files.get(path)
        if hit is None:
            return None
        try:
            return hit[0].read_bytes(), hit[1], _IMMUTABLE
        except OSError:  # removed since start: Streamlit answers (a 404 or its page)
            return None


def _configured_base_path() -> str:
    from streamlit import config

    return config.get_option("server.baseUrlPath") or ""


def enable_tcp_nodelay() -> bool:
    """Send every small write of this server's connections at once (TCP_NODELAY). Returns False if it was on.

    Streamlit 1.67's server binds its listening socket itself, as ``socket.socket(family)``: its protocol number
    is 0, not IPPROTO_TCP, so asyncio's transports (``asyncio.base_events._set_nodelay``) leave Nagle's algorithm
    on for every connection it accepts. A response written as headers then body then waits for the browser's
    delayed acknowledgement: 40 ms per file on a kept-alive connection (61 front-end files fetched one after
    another: 2.58 s, with TCP_NODELAY 0.08-0.11 s), so a new tab took 1.34 s to its uploader instead of 1.13 s
    (chromium, 2 cores, servers with and without it alternated, 2026-12-06). The launcher turns it on before the
    server starts; a server started on Home.py itself, when its first page has run."""
    from asyncio import base_events

    current = base_events._set_nodelay
    if getattr(current, "medimg_nodelay", False):
        return False

    def _set_nodelay(sock: socket.socket) -> None:
        current(sock)
        if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM and sock.proto == 0:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # a socket closed in between: nothing to speed up
                pass

    _set_nodelay.medimg_nodelay = True  # type: ignore[attr-defined]
    base_events._set_nodelay = _set_nodelay
    return True
