"""deploy/prefect.yaml loads: every entrypoint imports to a flow and its parameters validate."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from flows.settings import BatchConfig
from prefect import Flow

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prefect.yaml"


def _deployments() -> list[dict]:
    return yaml.safe_load(DEPLOY.read_text())["deployments"]


def test_prefect_yaml_has_scheduled_and_gpu_deployments() -> None:
    deployments = _deployments()
    names = {d["name"] for d in deployments}
    assert {"nightly-fal", "on-demand-local-gpu", "sharded-local-gpu"} <= names
    nightly = next(d for d in deployments if d["name"] == "nightly-fal")
    assert nightly["schedules"][0]["cron"] == "0 2 * * *"
    pools = {d["work_pool"]["name"] for d in deployments}  # the sharded parent runs on CPU
    assert pools == {"avatarflow-cpu", "avatarflow-gpu"}


@pytest.mark.parametrize("deployment", _deployments(), ids=lambda d: d["name"])
def test_entrypoint_is_a_flow_and_parameters_validate(deployment: dict) -> None:
    module_path, func = deployment["entrypoint"].split(":")
    module = importlib.import_module(module_path.removesuffix(".py").replace("/", "."))
    assert isinstance(getattr(module, func), Flow)
    config = BatchConfig(**deployment["parameters"]["config"])
    assert config.backend in ("fal", "local")
    assert "key" not in deployment["parameters"]["config"].get("fal", {})
