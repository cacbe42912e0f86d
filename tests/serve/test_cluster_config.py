"""cluster.yaml is a valid Ray cluster-launcher config (Ray's own schema and checks)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_cluster_yaml_matches_rays_schema(config, schema):
    jsonschema.validate(config, schema)


def test_cluster_yaml_passes_rays_own_validation(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_has_cpu_and_gpu_workers_and_installs_gpu_extras(config):
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu = [t for t, v in types.items() if v["resources"].get("GPU", 0) >= 1]
    cpu = [t for t, v in types.items() if t != config["head_node_type"] and not v["resources"].get("GPU")]
    assert gpu and cpu
    # the GPU extras with the pins known to fit together, then faiss-gpu back on top of faiss-cpu
    assert any('pip install -c constraints/gpu.txt -e ".[vllm,gpu]"' in c for c in config["setup_commands"])
    assert any("--force-reinstall" in c and "faiss-gpu==" in c for c in config["setup_commands"])
    assert any("--head" in c for c in config["head_start_ray_commands"])


def test_the_schema_check_catches_a_broken_config(config, schema):
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    del bad["provider"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
