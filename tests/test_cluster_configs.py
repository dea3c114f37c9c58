"""The cluster configs, checked offline: Ray's own launcher schema, and KubeRay's required fields."""

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def _load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def test_aws_launcher_config_passes_ray_validation():
    cfg = prepare_config(_load("aws-gpu.yaml"))
    validate_config(cfg)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and head["resources"].get("remem_driver", 0) > 0
    gpus = {name: t for name, t in types.items() if t["resources"].get("GPU")}
    assert {t["resources"]["GPU"] for t in gpus.values()} >= {1, 8}
    assert all(t.get("min_workers", 0) == 0 for t in gpus.values())
    assert all(t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for t in gpus.values())
    # one GPU kind (a share sized on one overfills another): g5 nodes of 1 and 8 A10Gs
    assert {t["node_config"]["InstanceType"].split(".")[0] for t in gpus.values()} == {"g5"}
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())
    # the head runs the autoscaler: its profile has EC2 rights the workers' must not need
    assert head["node_config"]["IamInstanceProfile"] != next(iter(gpus.values()))["node_config"]["IamInstanceProfile"]
    assert cfg["idle_timeout_minutes"] > 0 and cfg["docker"]["image"]
    text = (CLUSTER / "aws-gpu.yaml").read_text().lower()
    assert "aws_secret_access_key" not in text and "aws_access_key_id" not in text


def test_launcher_validation_is_not_a_rubber_stamp():
    broken = copy.deepcopy(_load("aws-gpu.yaml"))
    broken["available_node_types"]["ray.worker.gpu1.spot"]["min_workers"] = "zero"
    import jsonschema

    with pytest.raises(jsonschema.ValidationError, match="zero"):
        validate_config(prepare_config(broken))


def test_fake_cluster_config_passes_schema_validation():
    cfg = _load("local-fake.yaml")
    validate_config(cfg)  # prepare_config needs an example file the 2.60 wheel does not ship
    provider = cfg["provider"]
    assert provider["type"] == "fake_multinode" and provider["launch_multiple"]
    assert provider["gcs_address"].startswith("127.0.0.1:")
    assert cfg["available_node_types"]["ray.worker.gpu"]["resources"]["GPU"] == 1
    assert cfg["idle_timeout_minutes"] >= 0.5


def test_kuberay_manifests_have_the_required_fields():
    docs = {
        d["kind"]: d
        for name in ("kuberay.yaml", "kuberay-job.yaml")
        for d in yaml.safe_load_all((CLUSTER / name).read_text())
    }
    # the cluster alone starts no sweep: its manifest once held the RayJob, which ran a placeholder spec at once
    assert {d["kind"] for d in yaml.safe_load_all((CLUSTER / "kuberay.yaml").read_text())} == {
        "ServiceAccount",
        "ConfigMap",
        "RayCluster",
    }
    cluster = docs["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["template"]["spec"]["containers"][0]["image"]
    (gpu,) = spec["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 < gpu["maxReplicas"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    job = docs["RayJob"]
    assert job["apiVersion"] == "ray.io/v1" and "remem sweep run" in job["spec"]["entrypoint"]
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    # the sweep spec the job runs is a valid SweepSpec
    from remem_ray.config import SweepSpec

    SweepSpec.model_validate(yaml.safe_load(docs["ConfigMap"]["data"]["sweep.yaml"]))
    assert all("secret" not in (CLUSTER / name).read_text().lower() for name in ("kuberay.yaml", "kuberay-job.yaml"))
    # a GPU pod asks for what a g5.2xlarge can give (8 vCPU, 32 GiB, less the kubelet's share),
    # and the spec's workers for no more than the pod has
    requests = gpu["template"]["spec"]["containers"][0]["resources"]["requests"]
    assert int(requests["cpu"]) < 8 and int(requests["memory"].removesuffix("Gi")) < 32
    job_spec = SweepSpec.model_validate(yaml.safe_load(docs["ConfigMap"]["data"]["sweep.yaml"]))
    assert job_spec.sweep.resources.teacher.cpus_per_worker <= int(requests["cpu"])
