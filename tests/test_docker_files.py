"""docker/: the Dockerfile and Grafana dashboard are valid and consistent with the metrics the app
really exports; the image's install script passes its check mode. The compose file, proxy and
Prometheus configuration: tests/test_compose_replicas.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

DOCKER = Path(__file__).resolve().parent.parent / "docker"
PROMQL_WORDS = {"histogram_quantile", "sum", "by", "rate", "le", "code", "kind", "reason", "irate", "avg"}


def test_dockerfile_non_root_healthcheck_on_ready():
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^ARG CUDA_BASE_IMAGE=nvidia/cuda:\S+-runtime-\S+$", text, re.MULTILINE)
    assert re.search(r"^FROM \$\{CUDA_BASE_IMAGE\}$", text, re.MULTILINE)
    assert re.search(r"^USER (?!root)\w+", text, re.MULTILINE)
    assert "HEALTHCHECK" in text and "/ready" in text
    assert "docker/install.sh" in text and 'CMD ["python", "-m", "service"]' in text


def test_install_script_check_mode():
    proc = subprocess.run(["bash", str(DOCKER / "install.sh"), "--check"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "check: OK" in proc.stdout and "torch 2.11.0+cu130" in proc.stdout


def test_install_check_fails_when_a_pin_disagrees(tmp_path):
    """The pins live in docker/stack.env; the Dockerfile's base image and pyproject's gpu extra must agree."""
    for name in ("install.sh", "Dockerfile"):
        (tmp_path / name).write_text((DOCKER / name).read_text())
    pins = (DOCKER / "stack.env").read_text()
    (tmp_path / "stack.env").write_text(pins.replace("FLASH_ATTN_4_VERSION=4.0.0b40", "FLASH_ATTN_4_VERSION=4.0.1")
                                        .replace("runtime-ubuntu24.04", "runtime-ubuntu22.04"))
    proc = subprocess.run(["bash", str(tmp_path / "install.sh"), "--check"], capture_output=True, text=True,
                          timeout=120, check=False, env={**os.environ, "PROJECT_DIR": str(DOCKER.parent)})
    assert proc.returncode != 0 and "check: FAILED" in proc.stdout
    assert "ARG CUDA_BASE_IMAGE differs" in proc.stdout and "flash-attn-4>=4.0.1" in proc.stdout


def test_benchmarks_record_the_tested_stack():
    import sys

    sys.path.insert(0, str(DOCKER.parent / "benchmarks"))
    from stack import stack, tested

    pins = tested()
    assert pins["TORCH_VERSION"] == "2.11.0" and pins["TORCH_CUDA"] == "cu130"
    record = stack()
    assert record["running"]["torch"] and record["on_tested_stack"] is False  # CPU CI runs torch 2.13+cpu


def test_dashboard_metrics_exist_in_app_metrics(tiny_weights):
    """Every metric a dashboard panel queries is in the app's real /metrics output."""
    import asyncio

    from service.app import create_app
    from service.testing import asgi_client, tiny_settings


    async def scrape():
        app = create_app(tiny_settings(tiny_weights))
        async with asgi_client(app) as c:
            assert (await c.post("/sample", json={"length": 13})).status_code == 200
            return (await c.get("/metrics")).text

    exported = set()
    for line in asyncio.run(scrape()).splitlines():
        if line.startswith("# TYPE"):
            _, _, name, kind = line.split()
            exported.add(name)
            if kind == "histogram":
                exported |= {name + "_bucket", name + "_sum", name + "_count"}
            if kind == "counter":
                exported.add(name + "_total")
            if kind == "info":
                exported.add(name + "_info")
    dash = json.loads((DOCKER / "grafana" / "dashboards" / "mhcflash.json").read_text())
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for word in ("latency", "throughput", "queue", "memory", "occupancy"):
        assert word in titles
    used = set()
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "prometheus" and panel["targets"]
        for target in panel["targets"]:
            names = set(re.findall(r"[a-zA-Z_][a-zA-Z0-9_]*", target["expr"])) - PROMQL_WORDS
            names = {n for n in names if not re.fullmatch(r"\d+m?", n) and "_" in n}
            assert names, target["expr"]
            used |= names
    missing = used - exported
    assert not missing, f"dashboard queries metrics the app does not export: {sorted(missing)}"
