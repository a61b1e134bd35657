"""`mhcflash_requests_total{route, code}` over real HTTP: every response the service gives is counted
once, by route template and status code, including those answered before a route handler runs
(body guard 400 / 413 / 415, router 404 / 405) and unhandled errors (500); the label sets the
service knows exist at 0 from start-up; unknown paths share one route label.

Each test starts its own server (tiny random weights, CPU, ~0.3 s) so the counts start from 0.
"""

from __future__ import annotations

from collections import Counter

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.request_metrics import UNMATCHED
from service.testing import ServerThread, make_tiny_weights, serve_in_thread, tiny_settings

MAX_BODY = 4096  # small body limit so a 413 is cheap to provoke


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_tiny_weights(tmp_path_factory.mktemp("metrics") / "tiny")


def request_counts(url: str) -> dict[tuple[str, str], float]:
    """(route, code) -> mhcflash_requests_total, parsed by prometheus-client's own parser."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name == "mhcflash_requests":
            for s in family.samples:
                out[(s.labels["route"], s.labels["code"])] = s.value
    return out


# (method, path, request kwargs) -> (route label, code) it must be counted under
JSON = {"content-type": "application/json"}
REQUESTS = [
    ("POST", "/sample", {"json": {"length": 13}}, ("/sample", "200")),
    ("POST", "/sample", {"json": {"length": 1}}, ("/sample", "422")),                    # below the range
    ("POST", "/sample?format=xml", {"json": {"length": 13}}, ("/sample", "422")),        # bad query
    ("POST", "/sample", {"content": b"\xff", "headers": JSON}, ("/sample", "400")),       # not UTF-8
    ("POST", "/sample", {"content": b"length=13"}, ("/sample", "415")),                  # no JSON type
    ("POST", "/sample", {"content": b" " * (MAX_BODY + 1), "headers": JSON}, ("/sample", "413")),
    ("GET", "/sample", {}, ("/sample", "405")),
    ("PUT", "/health", {"json": {}}, ("/health", "405")),
    ("GET", "/health", {}, ("/health", "200")),
    ("GET", "/ready", {}, ("/ready", "200")),
    ("GET", "/info", {}, ("/info", "200")),
    ("GET", "/no/such/path", {}, (UNMATCHED, "404")),
    ("GET", "/another-probe.php", {}, (UNMATCHED, "404")),
    ("POST", "/no/such/path", {"json": {}}, (UNMATCHED, "404")),
    ("POST", "/no/such/path", {"content": b"x"}, (UNMATCHED, "415")),
    ("GET", "/docs", {}, ("/docs", "200")),
]


def test_every_response_counted_once_by_route_and_code(weights):
    with serve_in_thread(tiny_settings(weights, max_body_bytes=MAX_BODY)) as srv:
        before = request_counts(srv.url)
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            for method, path, kw, (route, code) in REQUESTS:
                got = client.request(method, path, **kw).status_code
                assert str(got) == code, (method, path, got)
        after = request_counts(srv.url)
        known_routes = {r.path for r in srv.app.routes}
    want = Counter(label for *_, label in REQUESTS)
    want[("/metrics", "200")] += 1  # the first scrape
    delta = {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}
    assert delta == dict(want)  # each response once, under its route and code; nothing else moved
    assert {route for route, _ in after} <= known_routes | {UNMATCHED}  # probes do not add labels


def test_known_label_sets_exist_at_zero_from_start(weights):
    """Before any request, Prometheus already sees 0 for each route x code the service can answer, so
    `rate()` counts the first burst of a code (a series born at its first response misses it)."""
    with serve_in_thread(tiny_settings(weights)) as srv:
        counts = request_counts(srv.url)
    for label in [("/sample", c) for c in ("200", "400", "401", "405", "413", "415", "422", "429", "500",
                                           "503", "504")] + [
            ("/health", "200"), ("/health", "405"), ("/ready", "503"), ("/info", "401"), ("/docs", "200"),
            ("/metrics", "200"), (UNMATCHED, "404"), (UNMATCHED, "413"), (UNMATCHED, "415")]:
        assert counts.get(label) == 0.0, label
    assert not any(counts.values())  # nothing counted before the first response


def test_unhandled_error_counted_as_500(weights):
    """An exception escaping a route is answered 500 by the app's handler outside the counter, and is
    counted under its route."""
    app = create_app(tiny_settings(weights))

    @app.get("/boom")
    async def boom():
        raise RuntimeError("test failure")

    server = ServerThread(app).start()
    try:
        r = httpx.get(server.url + "/boom", timeout=10)
        counts = request_counts(server.url)
    finally:
        server.stop()
    assert r.status_code == 500 and "error_id" in r.json()
    assert counts[("/boom", "500")] == 1.0
