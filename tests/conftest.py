"""Shared fixtures: one loaded model per test session (the bundled SmolLM2, converted once)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def engine():
    from kvstash.engine import Engine

    e = Engine()
    # kernels chosen now and remembered in $KVSTASH_HOME/kernels.json, before any test points that file
    # elsewhere: the CLI and server processes the tests start then run the same kernels as this one
    e.runner.choose_kernels()
    return e


@pytest.fixture(scope="session")
def lm(engine):
    return engine.lm
