"""deploy/prefect.yaml loads as Prefect reads it: entrypoints are flows, parameters bind to their
signatures, the pull step's references resolve, and no key is ever a parameter."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect import Flow

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PREFECT_YAML = yaml.safe_load((DEPLOY / "prefect.yaml").read_text())


def _flow(entrypoint: str) -> Flow[..., Any]:
    module_path, name = entrypoint.split(":")
    module = importlib.import_module(module_path.removesuffix(".py").replace("/", "."))
    flow = getattr(module, name)
    assert isinstance(flow, Flow)
    return flow


def test_the_pull_step_sets_the_directory_the_clone_step_made() -> None:
    clone, cwd = PREFECT_YAML["pull"]
    step_id = clone["prefect.deployments.steps.git_clone"]["id"]
    directory = cwd["prefect.deployments.steps.set_working_directory"]["directory"]
    assert directory == "{{ " + step_id + ".directory }}"


def test_scheduled_fal_and_gpu_deployments_share_their_pools() -> None:
    deployments = {d["name"]: d for d in PREFECT_YAML["deployments"]}
    names = {"nightly-fal", "nightly-hybrid", "on-demand-fal", "on-demand-local-gpu"}
    assert names | {"sharded-local-gpu"} <= set(deployments)
    [nightly] = deployments["nightly-fal"]["schedules"]
    assert nightly["cron"] == "0 2 * * *"
    assert deployments["nightly-hybrid"]["schedules"] == [nightly]  # the same, paused
    assert deployments["nightly-hybrid"]["parameters"]["backend"] == "auto"
    # Its paths are placeholders: `prefect deploy --all` must not start a live nightly run on them.
    assert nightly["active"] is False
    assert deployments["nightly-fal"]["parameters"]["manifest"].startswith("s3://my-bucket/")
    pools = {d["work_pool"]["name"] for d in deployments.values()}
    assert pools == {"avatarflow-cpu", "avatarflow-gpu"}
    assert deployments["nightly-fal"]["concurrency_limit"]["limit"] == 1
    for deployment in deployments.values():  # a run past the limit waits instead of failing
        assert deployment["concurrency_limit"]["collision_strategy"] == "ENQUEUE"
        env = deployment["work_pool"]["job_variables"]["env"]
        assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
        # fal's hosts and key are the worker's: a pin would be resolved (to "" when unset) by
        # `prefect deploy` and override the worker's own environment.
        assert not [name for name in env if name.startswith(("FAL_", "AWS_"))]


@pytest.mark.parametrize("deployment", PREFECT_YAML["deployments"], ids=lambda d: d["name"])
def test_parameters_bind_to_the_flow_and_carry_no_secret(deployment: dict[str, Any]) -> None:
    flow = _flow(deployment["entrypoint"])
    flow.validate_parameters(deployment["parameters"])  # raises on an unknown or mistyped one
    assert not {"fal_key", "key", "api_key"} & set(flow.parameters.properties)
    assert all(not isinstance(value, dict) for value in deployment["parameters"].values())


def test_the_crash_automation_changes_silent_runs_to_crashed() -> None:
    [automation] = yaml.safe_load((DEPLOY / "automations.yaml").read_text())["automations"]
    assert automation["trigger"]["after"] == ["prefect.flow-run.heartbeat"]
    [action] = automation["actions"]
    assert (action["type"], action["state"]) == ("change-flow-run-state", "CRASHED")
    assert automation["trigger"]["within"] == 3 * 30  # three missed 30 s heartbeats
