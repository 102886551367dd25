"""Headless Chromium on a folder served from a loopback port, for the site and blog tests.

`offline_page(folder)` yields `(base, page, seen)`: every request outside `base` is aborted and
listed in `seen["outside"]`, every request in `seen["requests"]`, responses >= 400 in
`seen["broken"]`, script errors in `seen["errors"]` and console errors in `seen["console"]`.
`local_page(base)` is the same browser on a server of one's own (JupyterLab, for the widget tests).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REQUIRED = os.environ.get("PEFTTUTOR_REQUIRE_BROWSER") == "1"  # CI installs Chromium (and Hugo) and sets it
SKIP_REASON = "no Chromium here (CI installs it and sets PEFTTUTOR_REQUIRE_BROWSER=1)"
# Playwright adds --headless and a fresh temporary profile (--user-data-dir) itself; without the
# background-networking flags Chromium keeps trying hosts that this closed network refuses.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def local_page(base: str, **context_options):
    """Headless Chromium with one page that may load only from `base` (a loopback server already
    running); yields `(page, seen)`, `seen` as in the module docstring, for this page and any other
    opened with `page.context.new_page()`. `context_options` go to `browser.new_context` (e.g. `viewport`).
    Every request waits for the route below, which Playwright's sync API runs only while one of its
    calls waits: wait with `page.wait_for_*` or `expect`, never `time.sleep`, while a page loads."""
    from playwright.sync_api import sync_playwright

    seen: dict[str, list[str]] = {"requests": [], "outside": [], "broken": [], "errors": [], "console": []}

    def only_local(route):
        if route.request.url.startswith(base):
            route.continue_()
        else:
            seen["outside"].append(route.request.url)
            route.abort()

    def watch(page):
        page.on("request", lambda r: seen["requests"].append(r.url))
        page.on("response", lambda r: r.status >= 400 and seen["broken"].append(f"{r.status} {r.url}"))
        page.on("pageerror", lambda e: seen["errors"].append(str(e)))
        page.on("console", lambda m: m.type == "error" and seen["console"].append(f"{m.text} ({m.location})"))

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            context = browser.new_context(**context_options)
            context.route("**/*", only_local)
            context.on("page", watch)  # this page and any other opened in its context
            yield context.new_page(), seen
        finally:
            browser.close()


@contextlib.contextmanager
def offline_page(folder):
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        with local_page(base) as (page, seen):
            yield base, page, seen
    finally:
        server.shutdown()
        server.server_close()
