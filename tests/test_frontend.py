"""The launcher's front-end middleware (streamlit_app/frontend.py), called as ASGI with a stand-in Streamlit."""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

APP_DIR = Path(__file__).resolve().parent.parent / "streamlit_app"
if str(APP_DIR) not in sys.path:
    sys.path.insert(0, str(APP_DIR))

from frontend import (BASE_ADDRESS_SCRIPT, FrontEndMiddleware, page_shell, page_url_names,  # noqa: E402
                      static_files, streamlit_static_dir)

INDEX = '<!doctype html><html lang="en"><head><title>Streamlit</title></head><body></body></html>'
JS = b"export const x = 1;\n"


@pytest.fixture()
def static_dir(tmp_path: Path) -> Path:
    (tmp_path / "index.html").write_text(INDEX)
    (tmp_path / "static" / "js").mkdir(parents=True)
    (tmp_path / "static" / "js" / "index.abc123.js").write_bytes(JS)
    (tmp_path / "static" / "css").mkdir()
    (tmp_path / "static" / "css" / "index.def.css").write_text("body{}")
    return tmp_path


class Inner:
    """Stands in for Streamlit: records what reached it and answers 404."""

    def __init__(self) -> None:
        self.paths: list[tuple[str, str]] = []

    async def __call__(self, scope, receive, send) -> None:
        self.paths.append((scope["type"], scope.get("path", "")))
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b"streamlit"})


def call(mw: FrontEndMiddleware, path: str, method: str = "GET", kind: str = "http") -> tuple[int, dict, bytes]:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(msg):
        sent.append(msg)

    scope = {"type": kind, "path": path, "method": method, "headers": []}
    asyncio.run(mw(scope, receive, send))
    if not sent:
        return 0, {}, b""
    head = {k.decode(): v.decode() for k, v in sent[0].get("headers", [])}
    return sent[0]["status"], head, b"".join(m.get("body", b"") for m in sent[1:])


def test_page_names_are_streamlits_url_names_of_the_pages_folder():
    assert page_url_names(APP_DIR / "pages") == {"Pneumonia", "Cardiac", "Atrium_segmentation",
                                                 "Training_and_metrics", "PACS"}


def test_the_shell_carries_the_base_address_before_anything_else_in_its_head():
    shell = page_shell(INDEX).decode()
    assert shell.index(BASE_ADDRESS_SCRIPT) == shell.index("<head>") + len("<head>")
    assert shell.replace(BASE_ADDRESS_SCRIPT, "") == INDEX
    with pytest.raises(ValueError, match="no <head>"):
        page_shell("<html><body></body></html>")


def test_a_page_at_its_own_address_gets_the_shell_and_the_front_end_files_are_answered(static_dir):
    inner = Inner()
    mw = FrontEndMiddleware(inner, pages={"Pneumonia", "PACS"}, static_dir=static_dir, base_path=lambda: "")
    status, head, body = call(mw, "/Pneumonia")
    assert status == 200 and head["cache-control"] == "no-cache" and head["content-type"].startswith("text/html")
    assert body == page_shell(INDEX) and int(head["content-length"]) == len(body)
    status, head, body = call(mw, "/PACS", method="HEAD")
    assert status == 200 and body == b"" and int(head["content-length"]) == len(page_shell(INDEX))
    status, head, body = call(mw, "/static/js/index.abc123.js")
    assert (status, body) == (200, JS) and "immutable" in head["cache-control"]
    assert head["content-type"].startswith("text/javascript")
    assert call(mw, "/static/css/index.def.css")[1]["content-type"].startswith("text/css")
    assert inner.paths == []  # none of these reached Streamlit


@pytest.mark.parametrize("path,method,kind", [
    ("/", "GET", "http"),  # Home: Streamlit's own page (its address is the base already)
    ("/Unknown_page", "GET", "http"),
    ("/Pneumonia/_stcore/health", "GET", "http"),
    ("/Pneumonia", "POST", "http"),
    ("/static/js/missing.js", "GET", "http"),
    ("/static/js/../js/index.abc123.js", "GET", "http"),  # only exact names of files present at start
    ("/static/index.html", "GET", "http"),
    ("/_stcore/stream", "GET", "websocket"),
])
def test_everything_else_goes_to_streamlit_unchanged(static_dir, path, method, kind):
    inner = Inner()
    mw = FrontEndMiddleware(inner, pages={"Pneumonia"}, static_dir=static_dir, base_path=lambda: "")
    status, _, body = call(mw, path, method, kind)
    assert inner.paths == [(kind, path)]
    if kind == "http":
        assert (status, body) == (404, b"streamlit")


def test_a_base_url_path_is_honoured(static_dir):
    inner = Inner()
    mw = FrontEndMiddleware(inner, pages={"Pneumonia"}, static_dir=static_dir, base_path=lambda: "/medimg/")
    assert call(mw, "/medimg/Pneumonia")[2] == page_shell(INDEX)
    assert call(mw, "/medimg/static/js/index.abc123.js")[2] == JS
    for outside in ("/Pneumonia", "/static/js/index.abc123.js", "/medimgX/Pneumonia"):
        assert call(mw, outside)[2] == b"streamlit"
    assert [p for _, p in inner.paths] == ["/Pneumonia", "/static/js/index.abc123.js", "/medimgX/Pneumonia"]


def test_another_streamlit_layout_leaves_the_pages_to_streamlit(tmp_path):
    (tmp_path / "index.html").write_text("<html><body>no head</body></html>")
    inner = Inner()
    mw = FrontEndMiddleware(inner, pages={"Pneumonia"}, static_dir=tmp_path, base_path=lambda: "")
    assert mw.shell is None and mw.files == {}
    assert call(mw, "/Pneumonia")[2] == b"streamlit"


@pytest.mark.parametrize("pages", [set(), {"a/b"}, {""}])
def test_the_page_names_are_checked(static_dir, pages):
    with pytest.raises(ValueError, match="pages"):
        FrontEndMiddleware(Inner(), pages=pages, static_dir=static_dir)


def test_the_installed_streamlit_has_the_layout_the_middleware_serves():
    """If a Streamlit upgrade moved its front end, the launcher would silently lose its speed-up: say so here."""
    static = streamlit_static_dir()
    index = (static / "index.html").read_text(encoding="utf-8")
    assert "<head>" in index and "window.__streamlit" not in index
    files = static_files(static)
    listed = [line.split('"./')[1].split('"')[0] for line in index.splitlines() if '"./static/' in line]
    assert listed and all("/" + name in files for name in listed)
    # the front end still reads the base address from window.__streamlit.BACKEND_BASE_URL
    bundles = [p for p in (static / "static" / "js").glob("index.*.js") if "BACKEND_BASE_URL" in p.read_text()]
    assert bundles
