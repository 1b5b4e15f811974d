"""Shared pytest fixtures."""

from __future__ import annotations

import multiprocessing.process
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from tasks.data.datasets import PreparedData, Split
from tasks.data.pixels import ChannelStats
from tasks.params import Params, load_params

ROOT = Path(__file__).resolve().parents[1]

# Prefect servers started by tests would try to send telemetry; there is no network here.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# joblib (imbalanced-learn's neighbours) would otherwise run `lscpu` to count physical cores.
os.environ.setdefault("LOKY_MAX_CPU_COUNT", str(os.cpu_count() or 1))
# Asked once here, outside any test: Python answers it from a `uname -p` subprocess (and
# caches it), and importing MLflow asks it (its telemetry), so the first test to import
# MLflow would seem to start a subprocess.
platform.processor()


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: one worker per core, and one more. Much of the slow tier waits on servers
    and subprocesses: with two workers CI's 2 cores were 1.45 busy on average and the
    tests took 16 min 11 s; with three, 12 min 43 s (fresh clones, ``.ci/run``)."""
    return (os.cpu_count() or 1) + 1


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each worker gets its share of the cores, not torch's default of all
    of them: two workers of two threads each on two cores would thrash. So do the processes
    a worker starts (``dvc repro``'s stages, torchrun, servers), through OpenMP's variable."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        share = max(1, (os.cpu_count() or 1) // workers)
        os.environ.setdefault("OMP_NUM_THREADS", str(share))
        torch.set_num_threads(share)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``slow`` and ``browser`` tests are ``integration`` tests too (outside the fast tier);
    ``gpu`` tests need CUDA: without it they are skipped, saying so (CI has no GPU)."""
    import torch

    skip = pytest.mark.skip(reason="needs a CUDA device; none is present")
    for item in items:
        if ("slow" in item.keywords or "browser" in item.keywords) and (
            "integration" not in item.keywords
        ):
            item.add_marker(pytest.mark.integration)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)


class StartedSomething(RuntimeError):
    """A test outside the ``integration`` tier started a process or a server."""


def _refuse(item: pytest.Item, what: str):
    def refused(*args, **kwargs):
        raise StartedSomething(
            f'{item.nodeid} {what}, but the fast tier (`pytest -m "not integration"`) '
            "starts no server, subprocess or browser: mark the test (or its module) "
            "`@pytest.mark.integration`, or test the same property without one"
        )

    return refused


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    with _guard(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with _guard(item):
        return (yield)


def _guard(item: pytest.Item) -> ExitStack:
    """Outside ``integration``, starting a subprocess, a child process or a listening
    socket fails the test: the fast tier's promise is checked on every run, not assumed."""
    stack = ExitStack()
    if "integration" in item.keywords:
        return stack
    for target, name, what in (
        (subprocess.Popen, "_execute_child", "started a subprocess"),
        (multiprocessing.process.BaseProcess, "start", "started a child process"),
        (socket.socket, "listen", "opened a listening socket (a server)"),
    ):
        stack.enter_context(mock.patch.object(target, name, _refuse(item, what)))
    return stack


@contextmanager
def _tracking_uri_restored() -> Iterator[None]:
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        mlflow.set_tracking_uri(None)  # MLflow falls back to the variable, restored below
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(autouse=True)
def _tracking_uri_left_as_found() -> Iterator[None]:
    """Each test leaves MLflow's tracking URI as it found it: ``mlflow.set_tracking_uri``
    keeps a process-wide URI and exports ``MLFLOW_TRACKING_URI``, and under pytest-xdist
    one worker runs many files, so one test's store must not become the next file's."""
    with _tracking_uri_restored():
        yield


@pytest.fixture(autouse=True, scope="module")
def _tracking_uri_left_as_found_by_the_module() -> Iterator[None]:
    """The same for a module's own fixtures: one that points MLflow at the module's server
    (``tests/test_e2e.py``) runs before a test's fixture reads the URI, so only this
    one, set up before them and torn down after, sees what the module found. Without it
    the next file on that worker inherited the URL of a server stopped at teardown."""
    with _tracking_uri_restored():
        yield


# --- unit-test fixtures ---

TINY_CLASSES = 10
TINY_SIZE = 8  # 8x8 grayscale: the size of sklearn's digits, small enough for any test


def _tiny_split(rng: np.random.Generator, per_class: int) -> Split:
    labels = np.repeat(np.arange(TINY_CLASSES), per_class)
    # Each class has its own brightness plus noise: learnable, and no channel is constant.
    base = (10 + 25 * labels)[:, None, None, None]
    noise = rng.integers(-8, 9, size=(len(labels), TINY_SIZE, TINY_SIZE, 1))
    images = np.clip(base + noise, 0, 255).astype(np.uint8)
    return Split(images=images, labels=labels.astype(np.int64))


@pytest.fixture(scope="session")
def params() -> Params:
    """The real params.yaml, validated (frozen, so one copy serves the whole session)."""
    return load_params(ROOT / "params.yaml")


@pytest.fixture
def tiny_prepared() -> PreparedData:
    """In-memory PreparedData: 10 classes, 8x8x1 uint8, 3/2/2 images per class."""
    rng = np.random.default_rng(0)
    train, val, test = (_tiny_split(rng, n) for n in (3, 2, 2))
    return PreparedData(
        train=train,
        val=val,
        test=test,
        classes=tuple(str(i) for i in range(TINY_CLASSES)),
        stats=ChannelStats.of(train.images),
    )
