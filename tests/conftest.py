"""Shared test set-up: isolated Prefect home, one Prefect test server per session, markers."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.fakes.fal_server import FakeFal

# Before Prefect is imported anywhere: a private home, no telemetry from this offline machine.
_HOME = tempfile.mkdtemp(prefix="avatarflow-prefect-")
os.environ["PREFECT_HOME"] = _HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_UI_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.3")
for _var in ("FAL_KEY", "FAL_QUEUE_URL", "FAL_REST_URL", "FAL_CDN_URL", "PREFECT_API_URL"):
    os.environ.pop(_var, None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `slow` tests unless RUN_SLOW=1 and `gpu` tests without CUDA."""
    run_slow = os.environ.get("RUN_SLOW") == "1"
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: set RUN_SLOW=1"))
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="gpu: CUDA not available"))


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """A real Prefect API server on a temporary SQLite database, shared by the flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Run a module's tiny-model tests on one torch thread.

    Tiny tensors gain nothing from threads, and on an oversubscribed 2-core machine they run ~10x
    slower with them.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fal_server(request: pytest.FixtureRequest) -> Iterator[FakeFal]:
    """One loopback fake fal per test module; FAKE_FAL_LATENCY_S in the module sets its latency."""
    from tests.fakes.fal_server import FakeFal

    with FakeFal(latency_s=getattr(request.module, "FAKE_FAL_LATENCY_S", 0.2)) as fake:
        yield fake


@pytest.fixture
def fake(fal_server: FakeFal, request: pytest.FixtureRequest) -> FakeFal:
    """The module's fake fal with counters, faults and latency reset for this test."""
    fal_server.reset()
    fal_server.latency_s = getattr(request.module, "FAKE_FAL_LATENCY_S", 0.2)
    return fal_server
