"""Shared fixtures: one loaded model per test session (the bundled SmolLM2, converted once)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def engine():
    from kvstash.engine import Engine

    return Engine()


@pytest.fixture(scope="session")
def lm(engine):
    return engine.lm
