"""The cluster YAMLs pass Ray's own cluster-config validation (offline: no cloud SDK needed)."""
import copy
import re
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cluster_yaml_passes_rays_validator(name):
    raw = yaml.safe_load((CLUSTER / name).read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    workers = [t for n, t in types.items() if n != raw["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0
    assert all(w["max_workers"] >= 1 for w in workers)
    assert raw["max_workers"] >= sum(w["min_workers"] for w in workers)
    text = (CLUSTER / name).read_text()
    assert not re.search(r"(secret_access_key|access_key_id|private_key)\s*[:=]", text, re.I)
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    assert any("pip install" in c and "tsdsae" in c for c in raw["setup_commands"])


def test_gpu_workers_have_gpus():
    aws = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    assert aws["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"].startswith("g5.")
    gcp = yaml.safe_load((CLUSTER / "gcp.yaml").read_text())
    acc = gcp["available_node_types"]["gpu_worker"]["node_config"]["guestAccelerators"]
    assert acc[0]["acceleratorCount"] == 1


def test_validator_rejects_a_broken_yaml():
    raw = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    raw["available_node_types"]["gpu_worker"]["bogus_key"] = 1
    with pytest.raises(Exception, match="bogus_key"):
        validate_config(prepare_config(raw))
