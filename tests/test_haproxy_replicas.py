"""docker/haproxy.cfg in front of two real replicas: balancing, health checks, retries, Retry-After.

Two replicas of the real service (tiny random weights, CPU, uvicorn on loopback) and Debian's
`haproxy` run with docker/haproxy.cfg as committed, except where it meets Docker: it listens on a free
loopback port and its DNS `server-template` becomes one `server` line per local replica. Then:
- concurrent requests through the proxy are spread over both replicas (least connections);
- a replica whose /ready turns 503 gets no more requests once its health check fails, and a request
  it refused (503) before that is retried on the other replica: the client sees 200;
- right after the last one stops being ready, the service's own 503 and Retry-After reach the client;
- once no replica is healthy, the proxy answers 503 with Retry-After itself.
Skips when `haproxy` is absent (`apt-get install -y haproxy`; .ci/run installs it).
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.testing import serve_in_thread, tiny_settings

DOCKER = Path(__file__).resolve().parent.parent / "docker"
HAPROXY = shutil.which("haproxy")
WAIT_S = 20  # health checks: every 2 s, down after 2 failures

pytestmark = pytest.mark.skipif(HAPROXY is None, reason="haproxy not installed (apt-get install -y haproxy)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_config(listen: int, replica_ports: list[int]) -> str:
    text = (DOCKER / "haproxy.cfg").read_text()
    assert "    bind :8000\n" in text and text.count("server-template ") == 1
    servers = "".join(f"    server replica{i} 127.0.0.1:{p}\n" for i, p in enumerate(replica_ports))
    text = text.replace("    bind :8000\n", f"    bind 127.0.0.1:{listen}\n")
    text = re.sub(r"^\s*server-template .*\n", servers, text, flags=re.MULTILINE)
    return text.replace(" resolvers docker", "")


def samples_served(url: str) -> float:
    """POST /sample responses a replica has sent (any code), from its own /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == "mhcflash_requests":
            return sum(s.value for s in family.samples
                       if s.name.endswith("_total") and s.labels.get("route") == "/sample")
    raise AssertionError("mhcflash_requests_total not exported")


def wait_until(predicate, what: str):
    deadline = time.monotonic() + WAIT_S
    while True:
        result = predicate()
        if result:
            return result
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_proxy_balances_health_checks_and_keeps_retry_after(tmp_path, tiny_weights):
    with ExitStack() as stack:
        replicas = [stack.enter_context(serve_in_thread(tiny_settings(tiny_weights))) for _ in range(2)]
        listen = free_port()
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(local_config(listen, [r.port for r in replicas]))
        log = (tmp_path / "haproxy.log").open("w")
        proc = subprocess.Popen([HAPROXY, "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
        stack.callback(proc.wait, 10)
        stack.callback(proc.terminate)
        proxy = f"http://127.0.0.1:{listen}"
        client = stack.enter_context(httpx.Client(base_url=proxy, timeout=60))

        def post(length: int = 13) -> httpx.Response:
            return client.post("/sample", json={"length": length})

        def proxy_answers() -> bool:
            try:
                return client.get("/ready").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(proxy_answers, "proxy never answered /ready: " + (tmp_path / "haproxy.log").read_text())

        # Least connections: concurrent requests go to both replicas.
        with ThreadPoolExecutor(6) as pool:
            codes = [r.status_code for r in pool.map(lambda n: post(13 + n), range(6))]
        assert codes == [200] * 6
        served = [samples_served(r.url) for r in replicas]
        assert all(n >= 1 for n in served) and sum(served) == 6, served

        # Replica 0 stops being ready: a request it refuses with 503 before its check fails is retried on
        # replica 1, and once the check has failed it gets nothing.
        state0 = replicas[0].app.state.service
        state0.ready = False
        assert [post().status_code for _ in range(4)] == [200] * 4
        time.sleep(5)  # 2 failed checks, 2 s apart
        before = samples_served(replicas[0].url)
        assert [post().status_code for _ in range(4)] == [200] * 4
        assert samples_served(replicas[0].url) == before

        # Replica 1 stops being ready too: at first its own 503 and Retry-After come through (its check
        # has not failed yet), then the proxy answers 503 with Retry-After itself.
        replicas[1].app.state.service.ready = False
        first = post()
        assert first.status_code == 503 and first.headers["retry-after"] == "5"
        assert first.json()["detail"] == "the service is not ready"
        last = wait_until(lambda: (r := post()).status_code == 503 and "no replica" in r.text and r,
                          "the proxy never answered for itself")
        assert last.headers["retry-after"] == "5" and last.headers["content-type"] == "application/json"
