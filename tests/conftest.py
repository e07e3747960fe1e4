"""Shared fixtures: the tiny random model (fast) and, for tests marked slow, the bundled model."""

from __future__ import annotations

import os

import pytest

# The suite runs in fp32 on every machine unless told otherwise, not at what "auto" picks for the hardware;
# tests/test_precision.py forces each precision itself, and `make test` reruns the bf16-sensitive tests with
# LORAMEM_PRECISION=bf16.
os.environ.setdefault("LORAMEM_PRECISION", "fp32")

from loramem.models import load_base


@pytest.fixture(scope="session")
def tiny():
    return load_base("tiny")


@pytest.fixture(scope="session")
def smollm():
    return load_base("smollm2-135m")


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray (2 CPUs) for every test that needs one: starting Ray costs many seconds."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
