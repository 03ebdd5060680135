"""Static checks of cluster/: launcher YAMLs, KubeRay manifests, local.sh, Dockerfile.

No cluster is started and nothing leaves the machine: the launcher configs are
validated against the JSON schema that ships inside the installed Ray (the one
`ray up` itself applies) and through Ray's own prepare/validate steps.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
LAUNCHER_CONFIGS = ["aws.yaml", "gcp.yaml"]
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
LOCAL_SH = CLUSTER / "local.sh"
DOCKERFILE = CLUSTER / "Dockerfile"


def _load(path: Path):
    with open(path) as f:
        return yaml.safe_load(f)


def _load_all(path: Path) -> list:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    return json.loads(resources.files("ray.autoscaler").joinpath("ray-schema.json").read_text())


def _worker_types(cfg: dict) -> dict:
    head = cfg["head_node_type"]
    return {k: v for k, v in cfg["available_node_types"].items() if k != head}


def _ray_version_of_image(image: str) -> str:
    """rayproject/ray:2.60.0-py311-gpu -> 2.60.0"""
    m = re.match(r"rayproject/ray:(\d+\.\d+\.\d+)-", image)
    assert m, f"not a versioned rayproject/ray image: {image!r}"
    return m.group(1)


# --------------------------------------------------------------------------
# (a) launcher configs against Ray's own schema and validation


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_matches_ray_schema(name, ray_schema):
    jsonschema.validate(_load(CLUSTER / name), ray_schema)


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_passes_ray_prepare_and_validate(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(_load(CLUSTER / name)))
    # Checks the schema again plus: head_node_type is a declared type and the
    # global max_workers covers the sum of min_workers.
    validate_config(prepared)
    assert prepared["provider"]["type"] == name.split(".")[0]


def test_schema_check_rejects_a_broken_config(ray_schema):
    """The validator used above does catch mistakes (not a vacuous pass)."""
    cfg = _load(CLUSTER / "aws.yaml")
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu_8x_h100"]["resources"]["GPU"] = "8"  # not an integer
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, ray_schema)
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu_8x_h100"]["min_worker"] = 0  # typo'd key
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, ray_schema)


# --------------------------------------------------------------------------
# (b) node types: CPU-only head, GPU workers that scale from zero


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_head_is_cpu_only_and_takes_no_work(name):
    cfg = _load(CLUSTER / name)
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    assert head["resources"].get("GPU", 0) == 0


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_gpu_worker_types_scale_from_zero(name):
    cfg = _load(CLUSTER / name)
    workers = _worker_types(cfg)
    gpu_types = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) > 0}
    assert gpu_types, f"{name}: no worker type declares GPU resources"
    assert any(v["resources"]["GPU"] == 8 for v in gpu_types.values()), "no 8-GPU node type"
    assert any(v["resources"]["GPU"] == 1 for v in gpu_types.values()), "no 1-GPU node type"
    for k, v in workers.items():
        assert v.get("min_workers") == 0, f"{name}:{k} min_workers must be 0 (scale from zero)"
        assert 0 < v["max_workers"] <= cfg["max_workers"], f"{name}:{k} max_workers"
        assert v["resources"].get("CPU", 0) > 0, f"{name}:{k} has no CPUs to run workers on"
    assert cfg["idle_timeout_minutes"] > 0


def test_instance_types_are_the_advertised_gpus():
    aws = _load(CLUSTER / "aws.yaml")["available_node_types"]
    by_type = {v["node_config"]["InstanceType"]: v["resources"] for v in aws.values()}
    assert by_type["p5.48xlarge"]["GPU"] == 8
    assert any(t.startswith("g5.") and r.get("GPU") == 1 for t, r in by_type.items())
    gcp = _load(CLUSTER / "gcp.yaml")["available_node_types"]
    by_type = {v["node_config"]["machineType"]: v for v in gcp.values()}
    assert by_type["a3-highgpu-8g"]["resources"]["GPU"] == 8
    g2 = [v for t, v in by_type.items() if t.startswith("g2-standard-")]
    assert g2 and all(v["resources"]["GPU"] == 1 for v in g2)
    # GCE refuses GPU VMs that would live-migrate.
    for t, v in by_type.items():
        if v["resources"].get("GPU"):
            assert v["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE", t


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_token_auth_and_chatsft_install(name):
    cfg = _load(CLUSTER / name)
    # Every node gets RAY_AUTH_MODE=token and the client's token file.
    assert any("RAY_AUTH_MODE=token" in opt for opt in cfg["docker"]["run_options"])
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    setup = " ; ".join(cfg["setup_commands"])
    assert re.search(r"pip install\b.*(chatsft|-e \S*chatsft)", setup), setup
    # torch is pinned before chatsft is installed (an unpinned torch is GBs).
    torch_at = next(i for i, c in enumerate(cfg["setup_commands"]) if "torch==" in c)
    chatsft_at = next(i for i, c in enumerate(cfg["setup_commands"]) if "chatsft" in c)
    assert torch_at < chatsft_at
    assert any("--head" in c for c in cfg["head_start_ray_commands"])
    assert any("--address=$RAY_HEAD_IP" in c for c in cfg["worker_start_ray_commands"])


def test_gcp_project_must_be_set_by_the_user():
    # null makes `ray up` stop; a made-up id would make Ray try to create it.
    assert _load(CLUSTER / "gcp.yaml")["provider"]["project_id"] is None


# --------------------------------------------------------------------------
# (c) KubeRay manifests


def _pod_specs(cluster_spec: dict) -> list[tuple[str, dict]]:
    out = [("head", cluster_spec["headGroupSpec"]["template"]["spec"])]
    out += [(g["groupName"], g["template"]["spec"]) for g in cluster_spec["workerGroupSpecs"]]
    return out


def _ray_container(pod_spec: dict) -> dict:
    (c,) = [c for c in pod_spec["containers"] if c["name"].startswith("ray-")]
    return c


def _kuberay_docs():
    (rc,) = _load_all(RAYCLUSTER)
    (rj,) = _load_all(RAYJOB)
    return rc, rj


def test_kuberay_kinds_and_api_version():
    rc, rj = _kuberay_docs()
    assert (rc["apiVersion"], rc["kind"]) == ("ray.io/v1", "RayCluster")
    assert (rj["apiVersion"], rj["kind"]) == ("ray.io/v1", "RayJob")


@pytest.mark.parametrize("which", ["raycluster", "rayjob"])
def test_kuberay_cluster_spec(which):
    rc, rj = _kuberay_docs()
    spec = rc["spec"] if which == "raycluster" else rj["spec"]["rayClusterSpec"]
    assert spec["enableInTreeAutoscaling"] is True
    # authOptions needs an explicit rayVersion >= 2.52 (KubeRay validation).
    assert spec["authOptions"]["mode"] == "token"
    assert tuple(int(x) for x in spec["rayVersion"].split(".")) >= (2, 52, 0)
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    head = _ray_container(spec["headGroupSpec"]["template"]["spec"])
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})

    images = {name: _ray_container(pod)["image"] for name, pod in _pod_specs(spec)}
    assert len(set(images.values())) == 1, f"head and workers differ: {images}"

    gpu_groups = []
    for g in spec["workerGroupSpecs"]:
        assert g["minReplicas"] == 0 and g["maxReplicas"] >= 1, g["groupName"]
        assert g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], g["groupName"]
        res = _ray_container(g["template"]["spec"])["resources"]
        gpus = res.get("limits", {}).get("nvidia.com/gpu")
        if gpus is not None:
            assert int(gpus) >= 1
            # Kubernetes requires requests == limits for extended resources.
            assert res["requests"]["nvidia.com/gpu"] == gpus, g["groupName"]
            gpu_groups.append(g["groupName"])
    assert gpu_groups, "no worker group with nvidia.com/gpu limits"


def test_rayjob_runs_train_job_and_cleans_up():
    _, rj = _kuberay_docs()
    spec = rj["spec"]
    argv = spec["entrypoint"].split()
    assert argv[:2] == ["python", "jobs/train.py"]
    assert argv[2] == "configs/qwen2.5-0.5b-lora.yaml"
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http")
    # The relative entrypoint paths resolve against the repo copy in the image.
    assert runtime_env["working_dir"] == "/home/ray/chatsft"
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"


def test_ray_version_is_the_same_everywhere():
    """Client and cluster Ray versions must match; keep every file in step."""
    rc, rj = _kuberay_docs()
    versions = {
        "raycluster.rayVersion": rc["spec"]["rayVersion"],
        "rayjob.rayVersion": rj["spec"]["rayClusterSpec"]["rayVersion"],
    }
    for name in LAUNCHER_CONFIGS:
        versions[f"{name} docker.image"] = _ray_version_of_image(_load(CLUSTER / name)["docker"]["image"])
    m = re.search(r"^ARG RAY_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert m, "cluster/Dockerfile has no ARG RAY_IMAGE=..."
    versions["Dockerfile RAY_IMAGE"] = _ray_version_of_image(m.group(1))
    assert len(set(versions.values())) == 1, versions
    # Same image in both KubeRay manifests.
    images = {
        _ray_container(pod)["image"]
        for spec in (rc["spec"], rj["spec"]["rayClusterSpec"])
        for _, pod in _pod_specs(spec)
    }
    assert len(images) == 1, images


def test_dockerfile_installs_chatsft_on_a_ray_gpu_image():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG RAY_IMAGE=rayproject/ray:\S+-gpu$", text, re.M)
    assert re.search(r"^FROM \$\{RAY_IMAGE\}$", text, re.M)
    assert "pip install --no-cache-dir ${TORCH_SPEC}" in text
    assert re.search(r"pip install --no-cache-dir \.(\s|$)", text)
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore


# --------------------------------------------------------------------------
# (d) local.sh


def test_local_sh_is_valid_bash_and_executable():
    subprocess.run(["bash", "-n", str(LOCAL_SH)], check=True, capture_output=True)
    assert LOCAL_SH.stat().st_mode & 0o111, "cluster/local.sh is not executable"


def test_local_sh_cli_without_starting_anything():
    ok = subprocess.run(["bash", str(LOCAL_SH), "--help"], capture_output=True, text=True)
    assert ok.returncode == 0
    assert "stop" in ok.stdout and "--workers" in ok.stdout
    bad = subprocess.run(["bash", str(LOCAL_SH), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr
    bad = subprocess.run(
        ["bash", str(LOCAL_SH), "start", "--workers", "two"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "WORKERS" in bad.stderr


def test_local_sh_starts_head_and_workers_with_auth():
    text = LOCAL_SH.read_text()
    assert re.search(r'"\$RAY" start --head\b', text)
    assert re.search(r'"\$RAY" start --address=', text)
    assert re.search(r'"\$RAY" stop --force', text)
    assert "export RAY_AUTH_MODE" in text
    assert "RAY_AUTH_MODE=token ray job submit" in text
    # Several raylets on one host: the per-node flags that must differ.
    for flag in ("--temp-dir", "--dashboard-agent-listen-port", "--node-manager-port",
                 "--object-manager-port", "--num-cpus"):
        assert flag in text, flag
