"""The documentation site builds in strict mode and renders in a headless browser.

Skipped where Chromium is not installed. Screenshots go to ``$FUSIONKIT_DOCS_SCREENSHOTS`` when
set, else to the test's temporary folder.
"""

from __future__ import annotations

import functools
import html
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (apt-get install chromium); the site is not rendered",
)

PAGES = {
    "index.html": ["fusionkit", "The model", "What is in the box"],
    "concepts.html": ["Concepts", "Modality-wise (keyless) attention", "Attention backends"],
    "reference/fusionkit.html": [
        "fusionkit.build_model",
        "fusionkit.CMACLIP",
        "fusionkit.register",
    ],
}


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
        f"--user-data-dir={profile}", *args,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Build the site with ``mkdocs build --strict`` and serve it on 127.0.0.1."""
    out = tmp_path_factory.mktemp("site")
    # Not --quiet: it hides warnings from --strict, which then passes a site with broken links.
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    handler = functools.partial(_QuietHandler, directory=str(out))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield out, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = os.environ.get("FUSIONKIT_DOCS_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _internal_targets(dom: str, page_url: str, base: str) -> set[str]:
    targets = set()
    for href in re.findall(r'<a\b[^>]*?\bhref="([^"]*)"', dom):
        url = urljoin(page_url, html.unescape(href))
        if not url.startswith(base):
            continue
        path = unquote(urlsplit(url).path)[len(urlsplit(base).path) :]
        targets.add(path or "index.html")
    return targets


@pytest.mark.parametrize("page", list(PAGES))
def test_page_renders(site, page, tmp_path):
    out, base = site
    url = base + page
    result = _chromium("--virtual-time-budget=3000", "--dump-dom", url, profile=tmp_path / "p")
    dom = result.stdout
    assert "</html>" in dom, result.stderr[-2000:]
    text = html.unescape(re.sub(r"<[^>]+>", " ", dom))
    text = re.sub(r"\s+", " ", text)
    for heading in PAGES[page]:
        assert heading in text, f"{heading!r} not rendered on {page}"
    assert 'class="md-header' in dom and 'class="md-tabs' in dom, "theme did not render"
    missing = sorted(
        target
        for target in _internal_targets(dom, url, base)
        if not (out / target).is_file() and not (out / target / "index.html").is_file()
    )
    assert not missing, f"{page} links to missing files: {missing}"


@pytest.mark.parametrize("page", ["index.html", "concepts.html", "reference/fusionkit.html"])
def test_screenshot(site, page, screenshots, tmp_path):
    _, base = site
    png = screenshots / (page.replace("/", "_").removesuffix(".html") + ".png")
    png.unlink(missing_ok=True)
    result = _chromium(
        f"--screenshot={png}", "--window-size=1280,900", "--virtual-time-budget=3000",
        base + page, profile=tmp_path / "p",
    )  # fmt: skip
    assert png.is_file() and png.stat().st_size > 10_000, result.stderr[-2000:]


def test_api_examples_render_as_highlighted_code(site):
    out, _ = site
    pages = sorted((out / "reference").glob("*.html"))
    assert pages
    for page in pages:
        html = page.read_text(encoding="utf-8")
        # A docstring example read as Markdown turns its ">>>" prompts into nested quotes.
        assert "<blockquote>\n<blockquote>" not in html, page.name
    training = (out / "reference" / "training.html").read_text(encoding="utf-8")
    assert '<span class="gp">&gt;&gt;&gt; </span>' in training
