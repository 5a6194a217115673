"""Parameters that refuse what they do not know: the deployment's schema forbids unknown fields in
the nested settings (`fal`, `local`, `qc`), so the Prefect server refuses a run with a misspelt or
stray one (`fal: {key: ...}`) when it is created, before anything of it is stored."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.exceptions import PrefectHTTPStatusError

from avatarflow.flows.produce import produce_batch

pytestmark = pytest.mark.usefixtures("prefect_server")

SECRET = "fal-key-that-must-not-be-stored"


@pytest.fixture(scope="module")
def deployment_id() -> Iterator[UUID]:
    """produce_batch registered as a deployment as `prefect deploy` would (no worker needed:
    the runs here are refused or only created)."""
    deployment = produce_batch.to_deployment(
        name="parameter-schema", parameters={"manifest": "manifest.parquet", "backend": "fal"}
    )
    deployment_id = deployment.apply()
    yield deployment_id
    with get_client(sync_client=True) as client:
        client.delete_deployment(deployment_id)


def _runs(deployment_id: UUID) -> list[Any]:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )


def test_the_deployment_schema_forbids_unknown_settings_fields(deployment_id: UUID) -> None:
    with get_client(sync_client=True) as client:
        schema = client.read_deployment(deployment_id).parameter_openapi_schema
    assert schema is not None
    for name in ("FalSettings", "LocalSettings", "QCSettings"):
        assert schema["definitions"][name]["additionalProperties"] is False
    assert "key" not in schema["definitions"]["FalSettings"]["properties"]


@pytest.mark.parametrize(
    "stray",
    [
        {"fal": {"key": SECRET}},
        {"fal": {"queue_url": "http://127.0.0.1:9", "api_key": SECRET}},
        {"local": {"model_dirr": "/models/longcat"}},
        {"qc": {"face_min": 0.5}},
    ],
    ids=["fal.key", "fal.api_key", "local.model_dirr", "qc.face_min"],
)
def test_a_run_with_an_unknown_settings_field_is_refused_at_creation_and_not_stored(
    deployment_id: UUID, stray: dict[str, Any]
) -> None:
    with get_client(sync_client=True) as client:
        with pytest.raises(PrefectHTTPStatusError) as refused:
            client.create_flow_run_from_deployment(deployment_id, parameters=stray)
        assert refused.value.response.status_code == 409
        assert "Additional properties are not allowed" in refused.value.response.text
        assert SECRET not in refused.value.response.text

        # The same settings without the stray field are accepted: the field alone was refused.
        [(group, fields)] = stray.items()
        known = {k: v for k, v in fields.items() if k == "queue_url"}
        accepted = client.create_flow_run_from_deployment(deployment_id, parameters={group: known})
        assert [run.id for run in _runs(deployment_id)] == [accepted.id]
        client.delete_flow_run(accepted.id)
    assert _runs(deployment_id) == []
