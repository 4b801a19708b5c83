"""The compute dtype: ``auto`` picks bf16 only where the CPU has it natively; bad names are refused."""

from __future__ import annotations

import logging

import pytest

from kvstash.cli.main import build_parser
from kvstash.engine import EngineConfig
from kvstash.model import dtype as dtype_mod
from kvstash.model.dtype import native_bf16, resolve_dtype, warn_if_emulated


def test_auto_follows_the_cpu():
    assert resolve_dtype("auto", native=True) == "bfloat16"
    assert resolve_dtype("auto", native=False) == "float32"
    assert resolve_dtype("auto") == ("bfloat16" if native_bf16() else "float32")


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16"])
def test_concrete_names_pass_through(name):
    assert resolve_dtype(name, native=False) == name
    assert EngineConfig(dtype=name).dtype == name


def test_unknown_dtype_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="auto, float32, bfloat16 or float16, got 'fp8'"):
        resolve_dtype("fp8")
    with pytest.raises(ValueError, match="got 'fp8'"):
        EngineConfig(dtype="fp8")


def test_engine_config_resolves_auto(monkeypatch):
    monkeypatch.setattr(dtype_mod, "native_bf16", lambda: False)
    assert EngineConfig(dtype="auto").dtype == "float32"
    monkeypatch.setattr(dtype_mod, "native_bf16", lambda: True)
    assert EngineConfig(dtype="auto").dtype == "bfloat16"


@pytest.mark.parametrize("argv", [["ask", "x"], ["serve"], ["ingest", "x", "--store", "ram"], ["demo"]])
def test_command_line_default_is_auto(argv):
    assert build_parser().parse_args(argv).dtype == "auto"


def test_emulated_bf16_warns(monkeypatch, caplog):
    monkeypatch.setattr(dtype_mod, "native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="kvstash.model.dtype"):
        warn_if_emulated("bfloat16")
        warn_if_emulated("float32")
    assert len(caplog.records) == 1 and "emulated" in caplog.records[0].getMessage()
    monkeypatch.setattr(dtype_mod, "native_bf16", lambda: True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kvstash.model.dtype"):
        warn_if_emulated("bfloat16")
    assert not caplog.records
