"""Shared fixtures: the tiny random model (fast) and, for tests marked slow, the bundled model."""

from __future__ import annotations

import pytest

from loramem.models import load_base


@pytest.fixture(scope="session")
def tiny():
    return load_base("tiny")


@pytest.fixture(scope="session")
def smollm():
    return load_base("smollm2-135m")
