"""The API docs work without internet access: every HTML page the service serves (/docs, /redoc,
Swagger's OAuth2 redirect page) references no external host, and each asset a page references is
served by the app itself (fastapi-offline ships Swagger UI and ReDoc). With Debian's chromium, the
Swagger page is rendered headless with every host but the loopback unresolvable, and must list
the service's operations.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import httpx
import pytest

from service.testing import make_tiny_weights, serve_in_thread, tiny_settings

HTML_PAGES = ("/docs", "/redoc", "/docs/oauth2-redirect")
EXTERNAL = re.compile(r"(?:https?:)?//[A-Za-z0-9.-]+\.[A-Za-z]{2,}", re.IGNORECASE)  # scheme- or protocol-relative
REFERENCE = re.compile(r"""(?:src|href|spec-url)\s*=\s*["']([^"']+)["']|\burl:\s*["']([^"']+)["']""")
ASSET_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png", ".json": "application/json"}
BROWSER_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    weights = make_tiny_weights(tmp_path_factory.mktemp("docs") / "tiny")
    with serve_in_thread(tiny_settings(weights)) as srv:
        yield srv


def test_pages_reference_no_external_host_and_their_assets_are_served(server):
    for page in HTML_PAGES:
        r = httpx.get(server.url + page, timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), page
        assert not EXTERNAL.findall(r.text), (page, EXTERNAL.findall(r.text))
        if page == "/docs":
            assert '"validatorUrl": null' in r.text  # no validator badge fetched from swagger.io
        refs = [a or b for a, b in REFERENCE.findall(r.text)]
        if page != "/docs/oauth2-redirect":
            assert any(ref.endswith(".js") for ref in refs), (page, refs)
        for ref in refs:
            assert ref.startswith("/"), (page, ref)  # served by this app
            asset = httpx.get(server.url + ref, timeout=10)
            assert asset.status_code == 200, (page, ref)
            kind = next((v for k, v in ASSET_TYPES.items() if ref.endswith(k)), None)
            assert kind is not None and kind in asset.headers["content-type"], (ref, asset.headers["content-type"])
            assert len(asset.content) > 100, ref


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed (apt-get install -y chromium)")
def test_swagger_ui_renders_offline(server, tmp_path):
    """Headless chromium, every host except 127.0.0.1 unresolvable: Swagger UI still draws /sample."""
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000", "--dump-dom",
           server.url + "/docs"]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S)
    assert res.returncode == 0, res.stderr[-2000:]
    dom = res.stdout
    assert 'class="swagger-ui"' in dom, dom[:2000]
    assert "opblock-post" in dom and 'data-path="/sample"' in dom, dom[-3000:]
