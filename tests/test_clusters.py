"""The cluster-launcher configs: valid for Ray's own schema, installing this project from files that
exist, and never opening a port to the world (only SSH, only from the configurable CIDR)."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = REPO / "clusters"
WORLD = {"0.0.0.0/0", "::/0"}


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTERS / name).read_text())


@pytest.mark.parametrize("name", ["aws.yaml", "local.yaml"])
def test_valid_for_rays_schema(name: str) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = load(name)
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)  # raises jsonschema.ValidationError on a config Ray would refuse
    assert prepared["cluster_name"] == cfg["cluster_name"] and prepared["available_node_types"]


def _commands(cfg: dict[str, Any]) -> list[str]:
    keys = (
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    )
    out = [c for k in keys for c in cfg.get(k) or []]
    for node in (cfg.get("available_node_types") or {}).values():
        for k in ("initialization_commands", "worker_setup_commands"):
            out += node.get(k) or []
    return out


@pytest.mark.parametrize("name", ["aws.yaml", "local.yaml"])
def test_setup_installs_this_project_from_files_that_exist(name: str) -> None:
    cfg = load(name)
    mounts = cfg["file_mounts"]
    remote = next(r for r, local in mounts.items() if Path(local) == Path("."))  # the repo itself
    commands = _commands(cfg)
    assert any(re.search(rf"pip install .*-e {re.escape(remote)}(\s|$)", c) for c in commands), commands
    referenced = {m for c in commands for m in re.findall(rf"{re.escape(remote)}/([\w./-]+)", c)}
    home_form = "$HOME" + remote[1:] if remote.startswith("~") else remote  # as the .bashrc lines write it
    referenced |= {m for c in commands for m in re.findall(rf"{re.escape(home_form)}/([\w./-]+)", c)}
    assert "clusters/lpcgma.env" in referenced  # the .bashrc block loads the user's settings from the copy
    optional = {"clusters/lpcgma.env"}  # the user's own settings, loaded only when present
    for rel in referenced - optional:
        assert (REPO / rel).exists(), f"{name} refers to {rel}, which is not in the repository"
    assert (REPO / "pyproject.toml").is_file()
    assert (CLUSTERS / "lpcgma.env.example").is_file()
    # the venv and VCS folders never travel
    assert {".venv", ".git"} <= set(cfg.get("rsync_exclude") or [])


@pytest.mark.parametrize("name", ["aws.yaml", "local.yaml"])
def test_environment_of_the_nodes(name: str) -> None:
    text = "\n".join(_commands(load(name)))
    for setting in ("RAY_USAGE_STATS_ENABLED=0", "MLFLOW_DISABLE_TELEMETRY=true", "RAY_AUTH_MODE=token"):
        assert setting in text
    assert "--dashboard-host=127.0.0.1" in text
    assert "trial_driver" in text or "trial_driver" in yaml.safe_dump(load(name))


def test_aws_nodes_head_on_demand_gpu_workers_spot_with_fallback() -> None:
    cfg = load("aws.yaml")
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert "InstanceMarketOptions" not in head["node_config"]
    assert head["resources"].get("trial_driver", 0) >= 1  # trial drivers live on the non-spot head
    gpu = {k: v for k, v in types.items() if v["resources"].get("GPU")}
    instance_types = {v["node_config"]["InstanceType"] for v in gpu.values()}
    assert {"g5.xlarge", "g5.12xlarge"} <= instance_types
    for itype in ("g5.xlarge", "g5.12xlarge"):
        spot = [
            v
            for v in gpu.values()
            if v["node_config"]["InstanceType"] == itype
            and v["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        ]
        ondemand = [
            v
            for v in gpu.values()
            if v["node_config"]["InstanceType"] == itype and "InstanceMarketOptions" not in v["node_config"]
        ]
        assert spot and ondemand, itype
        assert min(s["priority"] for s in spot) > max(o["priority"] for o in ondemand)
    for v in gpu.values():
        assert v["min_workers"] == 0 and v["max_workers"] >= 1


def _walk(node: Any) -> list[Any]:
    out = [node]
    if isinstance(node, dict):
        for v in node.values():
            out += _walk(v)
    elif isinstance(node, list):
        for v in node:
            out += _walk(v)
    return out


def test_aws_no_keys_instance_profiles_and_own_security_group() -> None:
    cfg = load("aws.yaml")
    text = (CLUSTERS / "aws.yaml").read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    assert "aws_secret_access_key" not in text.lower() and "AWS_SECRET_ACCESS_KEY" not in text
    for node in cfg["available_node_types"].values():
        nc = node["node_config"]
        assert "IamInstanceProfile" in nc
        # a named group everywhere: the launcher never creates its own (which opens SSH to the world)
        assert nc.get("SecurityGroupIds")
    assert "security_group" not in cfg["provider"]


def _ingress(template: dict[str, Any]) -> list[dict[str, Any]]:
    rules = []
    for res in template["Resources"].values():
        if res["Type"] == "AWS::EC2::SecurityGroup":
            rules += res["Properties"].get("SecurityGroupIngress", [])
        if res["Type"] == "AWS::EC2::SecurityGroupIngress":
            rules.append(res["Properties"])
    return rules


def test_security_group_opens_only_ssh_from_the_configurable_cidr() -> None:
    template = yaml.safe_load((CLUSTERS / "aws_prerequisites.yaml").read_text())
    assert template["Parameters"]["SshCidr"]["Type"] == "String"
    rules = _ingress(template)
    assert rules
    for rule in rules:
        cidrs = [rule.get("CidrIp"), rule.get("CidrIpv6")]
        if any(c is not None for c in cidrs):
            assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22), rule
            assert rule.get("CidrIp") == {"Ref": "SshCidr"}, rule
        else:
            assert "SourceSecurityGroupId" in rule, rule  # intra-cluster only
    for value in _walk(template) + _walk(load("aws.yaml")) + _walk(load("local.yaml")):
        assert not (isinstance(value, str) and value in WORLD), "a rule open to the world"
    outputs = template["Outputs"]
    assert {"SecurityGroupId", "HeadInstanceProfileArn", "WorkerInstanceProfileArn"} <= set(outputs)


def test_planning_against_the_aws_node_types(tmp_path: Path) -> None:
    """What `run_search` plans on the head of this cluster (the bootstrap config lists the node types)."""
    from lpcgma.distributed.resources import NodeShape, ResourceError, autoscaler_nodes, plan_resources

    boot = tmp_path / "ray_bootstrap_config.yaml"
    boot.write_text((CLUSTERS / "aws.yaml").read_text())
    workers = autoscaler_nodes(boot)
    assert len(workers) == 8 + 4 + 2 + 1
    head = NodeShape(0, 0, 16, "head")
    one_gpu = plan_resources([head, *workers], 1, 4, 1)
    assert one_gpu.max_concurrent == 12 + 3 * 4
    four_gpu = plan_resources([head, *workers], 4, 8, 1)
    assert four_gpu.max_concurrent == 3 and not four_gpu.inline  # 3 g5.12xlarge × 4 GPUs
    with pytest.raises(ResourceError, match="largest node has 4"):
        plan_resources([head, *workers], 1, 4, 8)


def test_the_nodes_environment_file_is_never_committed() -> None:
    """clusters/lpcgma.env (the real copy of lpcgma.env.example) is git-ignored, yet still synced to the nodes."""
    import shutil
    import subprocess

    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", "clusters/lpcgma.env"], cwd=REPO, check=False)
    assert ignored.returncode == 0
    aws = yaml.safe_load((REPO / "clusters" / "aws.yaml").read_text())
    assert "clusters/lpcgma.env" not in aws.get("rsync_exclude", []) and "rsync_filter" not in aws
