"""The deployment files, validated without a Docker engine (none runs on our machines)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]


def _airflow_commands() -> dict[str, list[str]]:
    found = {}
    for name, service in SERVICES.items():
        command = service.get("command")
        if isinstance(command, list) and command and command[0] == "airflow":
            found[name] = command[1:]
    return found


def test_topology_has_every_role() -> None:
    for role in (
        "postgres",
        "redis",
        "object-store",
        "api-server",
        "scheduler",
        "dag-processor",
        "triggerer",
        "worker-default",
        "worker-gpu",
        "airflow-init",
    ):
        assert role in SERVICES, role
    gpu = SERVICES["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]


@pytest.mark.parametrize(("service", "args"), sorted(_airflow_commands().items()))
def test_airflow_commands_parse(service: str, args: list[str]) -> None:
    from airflow.cli.cli_parser import get_parser

    namespace = get_parser().parse_args(args)
    assert callable(namespace.func), service


def test_worker_queues_cover_the_dag_queues_and_pools_exist() -> None:
    served = set()
    for args in _airflow_commands().values():
        if args[:2] == ["celery", "worker"]:
            served |= set(args[args.index("--queues") + 1].split(","))
    dag_source = (ROOT / "dags" / "cg4ctr_dag_support.py").read_text()
    assert {"default", *re.findall(r'GPU_QUEUE = "(\w+)"', dag_source)} <= served
    init = " ".join(SERVICES["airflow-init"]["command"])
    for pool in re.findall(r'(?:GPU|DVC)_POOL = "(\w+)"', dag_source):
        assert f"airflow pools set {pool} " in init


def test_environment_matches_what_the_code_reads() -> None:
    env = next(iter(v for k, v in COMPOSE.items() if k == "x-airflow-env"))
    code = "\n".join(
        p.read_text() for folder in ("cg4ctr_tasks", "dags") for p in (ROOT / folder).rglob("*.py")
    )
    read_by_code = set(re.findall(r"\b(CG4CTR_[A-Z0-9_]+)\b", code)) - {"CG4CTR_PYTHON"}
    set_by_compose = {k for k in env if k.startswith("CG4CTR_")}
    assert read_by_code <= set_by_compose | {"CG4CTR_WORKSPACE"}
    assert set_by_compose <= read_by_code
    assert "AWS_ACCESS_KEY_ID" in env and "AWS_SECRET_ACCESS_KEY" in env


def test_every_compose_variable_is_documented_in_env_example() -> None:
    text = (ROOT / "docker" / "compose.yaml").read_text()
    used = set(re.findall(r"(?<!\$)\$\{(\w+)", text))
    documented = {
        line.split("=", 1)[0]
        for line in (ROOT / "docker" / ".env.example").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    }
    assert used <= documented


def test_image_installs_like_the_readme() -> None:
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    setup = (ROOT / ".ci" / "setup").read_text()
    assert "-c constraints.txt" in dockerfile and "-c constraints.txt" in setup
    assert "torch==2.14.1" in dockerfile and "torchvision==0.29.1" in dockerfile
    assert "USER cg4ctr" in dockerfile and "HEALTHCHECK" in dockerfile
    assert not re.search(r"(PASSWORD|SECRET|TOKEN)\s*=", dockerfile)
    for service in ("api-server", "scheduler", "worker-default", "postgres", "redis"):
        assert "healthcheck" in SERVICES[service], service
