"""The deployment files: Kubernetes manifests validated against the Kubernetes JSON schemas (kubernetes-validate
ships them, offline) and checked for consistency with each other and with the service; the nginx configuration
accepted by `nginx -t` and retrying a 429 on another replica for real; the Dockerfile's promises; the image
build script's answer where no container engine runs; `comfy-endpoint prefetch`, which the image build runs."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import kubernetes_validate
import pytest
import yaml

from container.fleet import nginx, nginx_program, render_nginx, start_replica, stop, wait_ready, wait_until

ROOT = Path(__file__).resolve().parents[1]
CONTAINER = ROOT / "container"
MANIFESTS = sorted((CONTAINER / "k8s").glob("*.yaml"))
VERSIONS = ("1.29.0", "1.37.0")  # the oldest Kubernetes these manifests claim, and the newest schemas shipped


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def all_resources() -> dict[tuple[str, str], dict]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for path in MANIFESTS for doc in documents(path)}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_each_manifest_validates_against_the_kubernetes_schemas(path, version):
    for doc in documents(path):
        try:  # strict: an unknown or misspelt field is an error too
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name} {doc['kind']}/{doc['metadata']['name']} at "
                        f"{'.'.join(map(str, exc.path))}: {exc.message}")


def test_a_broken_manifest_is_refused():
    """The validation above can fail: a probe port given as a list is not a Deployment."""
    deployment = all_resources()[("Deployment", "comfy-endpoint")]
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = [8188]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def test_the_deployment_drains_probes_and_gets_a_gpu():
    resources = all_resources()
    pod = resources[("Deployment", "comfy-endpoint")]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    grace = int(env["COMFY_ENDPOINT_DRAIN_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + grace  # SIGKILL only after a full drain
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert env["HF_HOME"].startswith("/cache/")
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["hub-cache"] == "/cache" and mounts["data"] == "/data"
    claim = next(v for v in pod["volumes"] if v["name"] == "hub-cache")["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in resources
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    annotations = resources[("Deployment", "comfy-endpoint")]["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["http"] and annotations["prometheus.io/path"] == "/metrics"


def test_services_autoscaler_and_balancer_point_at_the_deployment():
    resources = all_resources()
    labels = resources[("Deployment", "comfy-endpoint")]["spec"]["template"]["metadata"]["labels"]
    for name in ("comfy-endpoint", "comfy-endpoint-pods"):
        service = resources[("Service", name)]["spec"]
        assert service["selector"].items() <= labels.items()
        assert service["ports"][0]["targetPort"] == "http"
    assert resources[("Service", "comfy-endpoint-pods")]["spec"]["clusterIP"] == "None"
    hpa = resources[("HorizontalPodAutoscaler", "comfy-endpoint")]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "comfy-endpoint"}
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "comfy_endpoint_prompts_in_flight"  # /metrics has it
    balancer = resources[("Deployment", "comfy-endpoint-balancer")]["spec"]["template"]["spec"]
    env = {item["name"]: item["value"] for item in balancer["containers"][0]["env"]}
    assert "comfy-endpoint-pods." in env["COMFY_UPSTREAM_SERVERS"]
    config_map = balancer["volumes"][0]["configMap"]["name"]
    kustomization = yaml.safe_load((CONTAINER / "kustomization.yaml").read_text())
    assert {Path(r).name for r in kustomization["resources"]} == {p.name for p in MANIFESTS}
    generated = kustomization["configMapGenerator"][0]
    assert generated["name"] == config_map
    for item in generated["files"]:
        assert (CONTAINER / item.split("=")[-1]).is_file()


@pytest.fixture
def nginx_binary() -> Path:
    try:
        return nginx_program()
    except FileNotFoundError as exc:
        pytest.fail(f"{exc}: .ci/run installs Debian's nginx package")


def test_the_nginx_configuration_is_accepted_by_nginx(nginx_binary, tmp_path):
    config = render_nginx(tmp_path, ["127.0.0.1:9001", "127.0.0.1:9002"], 9000)
    site = (tmp_path / "comfy-endpoint.conf").read_text()
    assert "${COMFY_" not in site  # every placeholder filled
    result = subprocess.run([str(nginx_binary), "-e", "stderr", "-p", str(tmp_path), "-t", "-c", str(config)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert re.search(r"proxy_next_upstream\s+error timeout http_503 http_429 non_idempotent;", site)
    assert re.search(r"proxy_read_timeout\s+600s;", site)
    broken = tmp_path / "broken"
    render_nginx(broken, ["127.0.0.1:9001"], 9000)
    (broken / "comfy-endpoint.conf").write_text(site.replace("non_idempotent;", "non_idempotent"))
    assert subprocess.run([str(nginx_binary), "-e", "stderr", "-p", str(broken), "-t", "-c",
                           str(broken / "nginx.conf")], capture_output=True, timeout=30).returncode != 0


def test_nginx_retries_a_full_replica_on_another_one(nginx_binary, tmp_path):
    """A replica whose queue limit is 0 answers every POST with 429; through nginx, every POST still gets 200
    from the other replica, the full one having been tried first where the balancer chose it."""
    full = start_replica(tmp_path / "full", cwd=ROOT, args=["--max-queue", "0", "--log-level", "warning"])
    free = start_replica(tmp_path / "free", cwd=ROOT, args=["--log-level", "warning"])
    try:
        wait_ready(free)
        wait_until(f"{full.url}/healthz", full.process, 60)  # never ready (its queue is at its limit): alive
        with nginx(tmp_path / "nginx", [f"127.0.0.1:{full.port}", f"127.0.0.1:{free.port}"]) as balancer:
            prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 4, "height": 4, "batch_size": 1,
                                                                   "color": 7}},
                      "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "lb"}}}
            answers = [httpx.post(f"{balancer.url}/api/v1/prompts", json=prompt, timeout=30,
                                  headers={"Cache-Control": "no-cache"}) for _ in range(6)]
    finally:
        stop(full.process)
        stop(free.process)
    assert [a.status_code for a in answers] == [200] * 6
    statuses = [a.headers["x-upstream-status"] for a in answers]
    assert "429, 200" in statuses, statuses  # at least one went to the full replica first


def test_the_dockerfile_keeps_its_promises():
    dockerfile = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, re.M).group(1)
    torch_pin = re.search(r'"torch==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert re.fullmatch(rf"pytorch/pytorch:{re.escape(torch_pin)}-cuda[\d.]+-cudnn\d+-runtime(@sha256:\w+)?",
                        base), base  # pinned, CUDA-enabled, and the project's torch
    assert len(re.findall(r"^FROM ", dockerfile, re.M)) == 2  # the build stage stays out of the image
    assert re.search(r"^USER comfy$", dockerfile, re.M)
    assert re.search(r'^VOLUME \["/data", "/cache"\]$', dockerfile, re.M)
    healthcheck = re.search(r"^HEALTHCHECK (?:.*\\\n)*.*$", dockerfile, re.M).group(0)  # with its continued lines
    assert "/healthz" in healthcheck
    assert dockerfile.index("comfy-endpoint prefetch") < dockerfile.index("\nVOLUME ")  # baked before the volume
    assert re.search(r'^ENTRYPOINT \["python", "-m", "container.entrypoint"\]$', dockerfile, re.M)
    ignored = [line for line in (ROOT / ".dockerignore").read_text().split("\n") if line and line[0] != "#"]
    assert ignored[0] == "*" and "!tests/" not in ignored and "!.venv" not in ignored


def test_the_build_script_says_so_when_no_container_engine_runs(tmp_path):
    bin_dir = tmp_path / "bin"  # a PATH with neither docker nor podman
    bin_dir.mkdir()
    for tool in ("dirname",):
        os.symlink(subprocess.check_output(["bash", "-c", f"command -v {tool}"], text=True).strip(), bin_dir / tool)
    result = subprocess.run(["/bin/bash", str(CONTAINER / "build_and_smoke.sh")], capture_output=True, text=True,
                            env={"PATH": str(bin_dir)}, timeout=30)
    assert result.returncode == 77
    assert "no usable container engine" in result.stderr


def test_prefetch_finds_preload_models_or_says_why(tmp_path):
    data = tmp_path / "data"
    (data / "models" / "checkpoints").mkdir(parents=True)
    (data / "models" / "checkpoints" / "here.safetensors").write_bytes(b"x")
    result = subprocess.run([sys.executable, "-m", "handler.cli", "prefetch", "--data-dir", str(data), "--preload",
                             "checkpoints/here.safetensors,checkpoints/elsewhere.safetensors"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1  # the second is nowhere
    assert result.stdout.strip() == f"checkpoints/here.safetensors: {data / 'models/checkpoints/here.safetensors'}"
    assert "elsewhere.safetensors" in result.stderr
