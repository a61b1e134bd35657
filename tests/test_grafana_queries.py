"""Every expression of the Grafana dashboard, run by a real Prometheus scraping the real service.

The service (tiny random weights, CPU) serves on a loopback port; Debian's `prometheus` binary
scrapes it every second with docker/prometheus.yml (interval and target rewritten), its data in a
temporary directory. The test then checks, through Prometheus' HTTP API:
- before any sample: the batch-occupancy panels answer 0 (not an empty 0 / 0), and the 422 series
  of POST /sample already exists at 0;
- after a few requests (200s, a burst of 422s, 404 / 405 / 415 before any handler): every panel
  expression returns data, the legends' `{{label}}`s are labels of the series, the Throughput
  panel's 422 line is > 0 (the whole burst: its series existed before it) and occupancy is > 0;
- idle again (window shortened so the test need not wait a minute): occupancy panels answer 0.
Skips when the `prometheus` binary is absent (`apt-get install -y prometheus`; .ci/run installs it).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from service.testing import serve_in_thread, tiny_settings

yaml = pytest.importorskip("yaml")

DOCKER = Path(__file__).resolve().parent.parent / "docker"
PROMETHEUS = shutil.which("prometheus")
SCRAPE_S = 1
WAIT_S = 30  # for Prometheus to start, and for a scrape to see what was sent
THROUGHPUT_BY_CODE = 'sum by (code) (rate(mhcflash_requests_total{route="/sample"}[1m]))'
BURST_422 = 5
IDLE_WINDOW = "4s"  # stands in for the panels' 1m window in the idle check (4 scrapes)

pytestmark = pytest.mark.skipif(PROMETHEUS is None,
                                reason="prometheus not installed (apt-get install -y prometheus)")


def dashboard_targets() -> list[tuple[str, dict]]:
    dash = json.loads((DOCKER / "grafana" / "dashboards" / "mhcflash.json").read_text())
    return [(panel["title"], target) for panel in dash["panels"] for target in panel["targets"]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusStarting(Exception):
    """Prometheus answered 503: up, not ready to answer queries yet."""


class Prometheus:
    """`prometheus` on 127.0.0.1:<free port> scraping `target` every SCRAPE_S seconds."""

    def __init__(self, workdir: Path, target: str) -> None:
        config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
        config["global"].update(scrape_interval=f"{SCRAPE_S}s", evaluation_interval=f"{SCRAPE_S}s")
        job = config["scrape_configs"][0]
        job.pop("dns_sd_configs")  # the compose replicas, found by Docker's DNS: here one local target
        job["static_configs"] = [{"targets": [target]}]
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = (workdir / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.log_path = workdir / "prometheus.log"

    def query(self, expr: str) -> list[dict]:
        r = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10)
        if r.status_code == 503:  # listening, but its storage is still starting
            raise PrometheusStarting(r.text)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def wait(self, expr: str, predicate, what: str):
        """Poll `expr` until `predicate(result)`; fail naming `what` after WAIT_S."""
        deadline = time.monotonic() + WAIT_S
        while True:
            assert self.proc.poll() is None, "prometheus exited: " + self.log_path.read_text()[-2000:]
            try:
                result = self.query(expr)
                if predicate(result):
                    return result
            except httpx.TransportError:
                result = "not listening yet"
            except PrometheusStarting:
                result = "starting (503)"
            assert time.monotonic() < deadline, f"{what}: {expr} -> {result}"
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def value(series: dict) -> float:
    return float(series["value"][1])


def test_every_dashboard_expression_returns_data(tmp_path, tiny_weights):
    with serve_in_thread(tiny_settings(tiny_weights)) as srv:
        prom = Prometheus(tmp_path, srv.url.removeprefix("http://"))
        try:
            prom.wait('up{job="mhcflash"}', lambda r: r and value(r[0]) == 1, "service not scraped")
            # Idle: no step yet. The occupancy panels answer 0, and the 422 line exists at 0.
            for title, target in dashboard_targets():
                if title == "Batch occupancy":
                    result = prom.query(target["expr"])
                    assert [value(s) for s in result] == [0.0], (target["expr"], result)
            prom.wait('mhcflash_requests_total{route="/sample",code="422"}', lambda r: r and value(r[0]) == 0,
                      "422 series not at 0 before any request")

            with httpx.Client(base_url=srv.url, timeout=60) as client:
                for body in ({"length": 21, "count": 2}, {"length": 13}):
                    assert client.post("/sample", json=body).status_code == 200
                for _ in range(BURST_422):
                    assert client.post("/sample", json={"length": 1}).status_code == 422
                assert client.get("/no/such/path").status_code == 404
                assert client.put("/health", json={}).status_code == 405
                assert client.post("/sample", content=b"length=13").status_code == 415
            prom.wait('mhcflash_requests_total{route="/sample",code="422"}',
                      lambda r: r and value(r[0]) == BURST_422, "burst of 422s not scraped")

            for title, target in dashboard_targets():
                result = prom.query(target["expr"])
                assert result, f"{title}: {target['expr']} returned no data"
                for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")):
                    assert all(label in s["metric"] for s in result), (title, label, result)
                if title == "Batch occupancy":
                    assert value(result[0]) > 0, (target["expr"], result)
            by_code = {s["metric"]["code"]: value(s) for s in prom.query(THROUGHPUT_BY_CODE)}
            assert by_code["422"] > 0 and by_code["200"] > 0, by_code
            other = {s["metric"]["code"]: value(s) for s in prom.query(
                'sum by (code) (rate(mhcflash_requests_total{route!="/sample",code=~"4..|5.."}[5m]))')}
            assert other["404"] > 0 and other["405"] > 0, other

            # Idle after work: with the window shortened to IDLE_WINDOW, rate(sum) / rate(count) is
            # 0 / 0 = NaN (a gap in Grafana); the panels' form answers 0.
            prom.wait(f"sum(rate(mhcflash_batch_size_count[{IDLE_WINDOW}]))", lambda r: r and value(r[0]) == 0,
                      "engine still stepping")
            raw = prom.query(f"rate(mhcflash_batch_size_sum[{IDLE_WINDOW}]) / "
                             f"rate(mhcflash_batch_size_count[{IDLE_WINDOW}])")
            assert raw and math.isnan(value(raw[0])), raw
            for title, target in dashboard_targets():
                if title == "Batch occupancy":
                    expr = target["expr"].replace("[1m]", f"[{IDLE_WINDOW}]")
                    assert [value(s) for s in prom.query(expr)] == [0.0], expr
        finally:
            prom.stop()
