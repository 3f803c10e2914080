"""The deployment files in cluster/: Ray's launcher schema, KubeRay fields, the Dockerfile, authentication."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from distrain.launch import job
from tests.helpers import CLUSTER, RAY_PIN, ROOT

# ------------------------------------------------------------------------------------------- deployment files


def test_aws_launcher_yaml_validates_against_rays_schema():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))  # what `ray up` runs: defaults filled in, node types cross-checked

    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # no training on the head
    gpu = [t for name, t in types.items() if name != config["head_node_type"] and "labels" not in t]
    assert len(gpu) == 1 and gpu[0]["min_workers"] == 0 < gpu[0]["max_workers"] <= config["max_workers"]
    assert gpu[0]["node_config"]["InstanceType"].startswith(("g", "p"))  # a GPU instance family
    # the optional data group of data.engine=ray_data: CPU-only, carrying the label its tasks select
    data = [t for t in types.values() if "labels" in t]
    assert len(data) == 1 and data[0]["labels"] == {"distrain-role": "data"} and data[0]["min_workers"] == 0
    assert data[0]["node_config"]["InstanceType"].startswith(("c", "m"))
    assert gpu[0]["max_workers"] + data[0]["max_workers"] <= config["max_workers"]
    assert config["docker"]["image"].endswith(":0.1.0")
    assert any("--shm-size" in o for o in config["docker"]["run_options"])
    assert "~/.ray/auth_token" in config["file_mounts"].values()
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "--autoscaling-config=~/ray_bootstrap_config.yaml" in start


def _pod_templates(spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    return [(name, g["template"]["spec"]) for name, g in groups]


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifests_name_the_fields_kuberay_requires(name):
    doc = yaml.safe_load((CLUSTER / "kuberay" / name).read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob"}[name]
    spec = doc["spec"]
    if doc["kind"] == "RayJob":
        assert spec["entrypoint"].startswith("python -m distrain ")
        assert spec["shutdownAfterJobFinishes"] is True
        spec = spec["rayClusterSpec"]
    assert spec["rayVersion"] == RAY_PIN
    assert isinstance(spec["headGroupSpec"]["rayStartParams"], dict)
    workers = spec["workerGroupSpecs"]
    assert workers
    for g in workers:
        assert {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams"} <= set(g)
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    pvc = yaml.safe_load((CLUSTER / "kuberay" / "storage.yaml").read_text())
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    images = set()
    for group, pod in _pod_templates(spec):
        shared = [v["name"] for v in pod["volumes"]
                  if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]]
        assert len(shared) == 1, f"{group}: no volume from the shared PVC"
        for c in pod["containers"]:
            images.add(c["image"])
            limits = c["resources"]["limits"]
            assert {"cpu", "memory"} <= set(limits)
            # GPUs on training workers; none on the head or on data.engine=ray_data's CPU-only data pods
            assert ("nvidia.com/gpu" in limits) == (group not in ("head", "data")), group
            mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
            assert mounts[shared[0]] == "/mnt/shared", f"{group}: shared volume not mounted"
            if group == "data":  # they decode images: no W&B key (least privilege), the label its tasks select
                assert "env" not in c
                data = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "data")
                assert data["rayStartParams"] == {"labels": "distrain-role=data"}
                continue
            key = [e for e in c["env"] if e["name"] == "WANDB_API_KEY"]
            assert key and key[0]["valueFrom"]["secretKeyRef"]["name"] == "wandb", f"{group}: no W&B secret"
            assert "value" not in key[0]  # never the key itself
    assert len(images) == 1  # every pod runs the same image


def test_rayjob_entrypoint_is_a_valid_distrain_command_on_the_shared_volume():
    spec = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "distrain"]
    # The config path is the image's copy of configs/ (WORKDIR /home/ray/distrain in the Dockerfile).
    in_image = "/home/ray/distrain/"
    config = argv[argv.index("--config") + 1]
    assert config.startswith(in_image)
    local = [a if a != config else str(ROOT / config[len(in_image):]) for a in argv[3:]]
    command, _, cfg = job.parse_command(local)
    assert command == "train"
    assert cfg.data.shards.startswith("/mnt/shared/") and cfg.scaling.storage_path.startswith("/mnt/shared/")


def test_dockerfile_builds_the_pinned_stack_from_pyproject():
    text = (CLUSTER / "Dockerfile").read_text()
    base = next(line.split("=", 1)[1] for line in text.splitlines() if line.startswith("ARG RAY_IMAGE="))
    assert base.startswith(f"rayproject/ray:{RAY_PIN}-py311")  # official image, same Ray as the pin
    assert "FROM ${RAY_IMAGE}" in text
    assert "tomllib.load(open('pyproject.toml'" in text and "pip install -r /tmp/requirements.txt" in text
    assert f"ray.__version__ == '{RAY_PIN}'" in text
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1:][:4] and "!distrain/" in ignore and "!.git" not in ignore
    assert not any(i.startswith(("!data", "!outputs", "!.venv", "!wandb")) for i in ignore)




def test_kuberay_clusters_require_the_token_and_admit_only_their_own_pods():
    cluster = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    assert cluster["spec"]["authOptions"] == {"mode": "token"}
    assert job["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    header = (CLUSTER / "kuberay" / "raycluster.yaml").read_text().split("apiVersion")[0]
    assert "KubeRay v1.5.1 or later" in header and "RAY_AUTH_TOKEN=" in header and "auth_token" in header
    policy = yaml.safe_load((CLUSTER / "kuberay" / "networkpolicy.yaml").read_text())
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Ingress"]
    head = policy["spec"]["podSelector"]["matchLabels"]
    assert head == {"app.kubernetes.io/name": "distrain", "ray.io/node-type": "head"}
    (rule,) = policy["spec"]["ingress"]
    assert sorted(p["port"] for p in rule["ports"]) == [6379, 8265, 10001]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "distrain"}}}]
    # every pod of both manifests carries the label the policy admits (a RayJob's submitter too)
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        assert all(g["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == "distrain" for g in groups)
    assert job["spec"]["submitterPodTemplate"]["metadata"]["labels"] == {"app.kubernetes.io/name": "distrain"}


def test_aws_nodes_start_ray_with_token_auth_and_require_imdsv2():
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token ray start" in c for c in starts), key
    for name, node in config["available_node_types"].items():
        assert node["node_config"]["MetadataOptions"]["HttpTokens"] == "required", name
    text = (CLUSTER / "aws.yaml").read_text()
    assert "least-privilege" in text and "IamInstanceProfile" in text


def test_runtime_env_keeps_credentials_out_and_the_image_bakes_no_build_arguments():
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert {".env", "*.pem", "*.key", ".netrc", ".aws/", ".ssh/"} <= set(env["excludes"])
    from distrain.launch.workdir import DEFAULT_EXCLUDES

    assert env["excludes"] == DEFAULT_EXCLUDES
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    env_block = [line for line in dockerfile.splitlines() if line.startswith("ENV") or line.startswith("    ")]
    assert not any("${" in line for line in env_block if "PIP_EXTRA_INDEX_URL" in line)
    assert "PIP_EXTRA_INDEX_URL=${" not in dockerfile
    assert "ARG PIP_EXTRA_INDEX_URL" in dockerfile
