"""Shared test set-up: isolated Prefect home per process (xdist worker), one Prefect test server per
worker, the fake fal fixtures, session tiny checkpoints, markers."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from distributed import LocalCluster

    from tests.fakes.fal_server import FakeFal

# Before Prefect is imported anywhere: a private home, no telemetry from this offline machine.
# Every xdist worker is its own process and imports this file itself, so each gets its own home
# (and so its own SQLite database and test server); the worker id is in the name for debugging.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")
_HOME = tempfile.mkdtemp(prefix=f"avatarflow-prefect-{_WORKER}-")
os.environ["PREFECT_HOME"] = _HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_UI_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.3")
# Nothing of the developer's own environment may steer a test: fal's hosts and key, a Prefect
# API, or the local backend's settings (pydantic-settings read them at construction).
for _var in list(os.environ):
    if _var.startswith(("FAL_", "AVATARFLOW_LOCAL_")) or _var == "PREFECT_API_URL":
        os.environ.pop(_var)


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


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """Two worker processes, each advertising one GPU, as `dask worker --resources GPU=1` does."""
    from tests.factories import gpu_cluster

    with gpu_cluster(2, threads=2) as cluster:
        yield cluster


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


def _tiny_checkpoint(factory: pytest.TempPathFactory, version: str) -> Path:
    from avatarflow.model.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(factory.mktemp(f"tiny-{version}"), version=version)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight v1.0 checkpoint (16 fps), written once per worker. Its
    avatarflow.json names a sample_size, so runs on it skip the frame-size check like `tiny`."""
    return _tiny_checkpoint(tmp_path_factory, "1.0")


@pytest.fixture(scope="session")
def tiny_checkpoint_v15(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight v1.5 checkpoint (Whisper audio, 25 fps), written once per worker."""
    return _tiny_checkpoint(tmp_path_factory, "1.5")


@pytest.fixture(scope="module")
def fal_server(request: pytest.FixtureRequest) -> Iterator[FakeFal]:
    """One loopback fake fal per test module; FAKE_FAL_LATENCY_S in the module sets its latency."""
    from tests.fakes.fal_server import FakeFal

    with FakeFal(latency_s=getattr(request.module, "FAKE_FAL_LATENCY_S", 0.05)) as fake:
        yield fake


@pytest.fixture
def fake(
    fal_server: FakeFal, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> FakeFal:
    """The module's fake fal with counters, faults and latency reset for this test, and the FAL_*
    variables pointing at it, so FalSettings() and FalSettings.api_key() find it."""
    fal_server.reset()
    fal_server.latency_s = getattr(request.module, "FAKE_FAL_LATENCY_S", 0.05)
    for name, value in fal_server.env().items():
        monkeypatch.setenv(name, value)
    return fal_server
