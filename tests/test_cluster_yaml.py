"""cluster.yaml passes Ray's own cluster-config schema (what `ray up` checks first) and has the node roles."""

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _config() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_validates_against_rays_schema():
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    validate_config(fillout_defaults(_config()))  # raises jsonschema.ValidationError / ValueError if not


def test_cluster_has_cpu_head_gpu_and_cpu_workers_with_bounds():
    cfg = _config()
    nodes = cfg["available_node_types"]
    assert cfg["head_node_type"] == "head" and nodes["head"]["resources"]["GPU"] == 0
    assert nodes["gpu_worker"]["node_config"]["InstanceType"].startswith(("g5", "p4d", "p5"))
    assert nodes["cpu_worker"]["node_config"]["InstanceType"].startswith(("c6i", "c7i", "m6i"))
    for name in ("gpu_worker", "cpu_worker"):
        assert 0 <= nodes[name]["min_workers"] <= nodes[name]["max_workers"] <= cfg["max_workers"]
    for node in nodes.values():  # S3 by instance role, never keys in the config
        assert "IamInstanceProfile" in node["node_config"]
    assert "aws_access_key_id" not in (REPO / "cluster.yaml").read_text().lower()


def test_nodes_install_platebench_from_its_wheel_and_the_head_serves_mlflow():
    cfg = _config()
    setup = " ".join(cfg["setup_commands"])
    assert "platebench-dist/platebench-*.whl" in setup
    assert cfg["file_mounts"]["/home/ubuntu/platebench-dist"] == "./dist"
    head = " ".join(cfg["head_start_ray_commands"])
    assert "mlflow server" in head and "--backend-store-uri sqlite:" in head and "--artifacts-destination s3://" in head
