"""A decoder layer's linear layers (attention projections and MLP), run through the model's own modules or
fused through oneDNN, whichever this CPU runs faster.

Fused: q, k and v are one ``[H*D + 2*KVH*D, hidden]`` weight and the MLP's gate and up one ``[2*I, hidden]``
weight (the shape of vLLM's QKV and merged gate-up layers), all run by oneDNN's linear
(:mod:`kvstash.model.linear`, from its packed copies of the weights): four matmuls a layer instead of seven,
each wider. The fused weights are built once and the modules' weights become views into them, so the plain
weights are held once and the modules still compute the same; oneDNN's packed copies are held next to them
(the layers' bytes once more, ~420 MB for SmolLM2 in fp32; ``KVSTASH_PACK_WEIGHTS=0`` goes without). On an AVX2
AMD EPYC (2 threads) SmolLM2's 30 layers take 42.5 ms fused and packed against 50 ms through MKL for one
row, and 64 against 184 ms for 8 rows (``benchmarks/linear_kernels.py``); :func:`projections` keeps the
faster, timed once per machine (:mod:`kvstash.model.choice`). If the modules win, the fused weights are dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from kvstash.model.choice import choose
from kvstash.model.linear import onednn_linear, onednn_ready, packing

log = logging.getLogger(__name__)
MARGIN = 0.97  # fused is kept unless it is not at least 3% faster (it measured 5-16% faster on an AVX2 EPYC)


class Projections:
    """One decoder layer's linear layers. ``qkv``: normed h [T, hidden] -> q [T, H*D], k, v [T, KVH*D];
    ``out``: attention output [T, H*D] -> [T, hidden]; ``mlp``: normed h [T, hidden] -> [T, hidden]."""

    def __init__(self, layer: torch.nn.Module):
        self.attn, self.mlp_module = layer.self_attn, layer.mlp

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = self.attn
        return a.q_proj(x), a.k_proj(x), a.v_proj(x)

    def out(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn.o_proj(x)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_module(x)


class FusedProjections(Projections):
    """The same layer with q/k/v and gate/up fused and every matmul through oneDNN (Llama's MLP:
    ``down(act(gate(x)) * up(x))``). Re-points the modules' weights at views of the fused ones."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__(layer)
        a, m = layer.self_attn, layer.mlp
        self.split = [a.q_proj.out_features, a.k_proj.out_features, a.v_proj.out_features]
        self.inner = m.gate_proj.out_features
        self.act = m.act_fn
        self.qkv_w = _fuse([a.q_proj, a.k_proj, a.v_proj])
        self.gate_up_w = _fuse([m.gate_proj, m.up_proj])
        self._qkv, self._gate_up = onednn_linear(self.qkv_w), onednn_linear(self.gate_up_w)
        self._o, self._down = onednn_linear(a.o_proj.weight), onednn_linear(m.down_proj.weight)

    @property
    def packed_bytes(self) -> int:
        """What oneDNN's packed copies of this layer's weights add (0 when they are read in place)."""
        return sum(f.packed_bytes for f in (self._qkv, self._gate_up, self._o, self._down))

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(self._qkv(x).split(self.split, dim=-1))

    def out(self, x: torch.Tensor) -> torch.Tensor:
        return self._o(x)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self._gate_up(x).split(self.inner, dim=-1)
        return self._down(self.act(gate) * up)


def fusable(layer: torch.nn.Module) -> bool:
    """Plain ``nn.Linear`` layers without biases in a oneDNN dtype, and a gated MLP with an ``act_fn``."""
    a, m = layer.self_attn, layer.mlp
    linears = [getattr(a, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    linears += [getattr(m, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    return (
        all(type(x) is torch.nn.Linear and x.bias is None and onednn_ready(x.weight) for x in linears)
        and callable(getattr(m, "act_fn", None))
        and len({x.weight.dtype for x in linears}) == 1
    )


def projections(model: torch.nn.Module) -> list[Projections]:
    """Every decoder layer's :class:`Projections`: fused through oneDNN where that is measurably faster here,
    else the modules. Chosen once per model and remembered on it, timed once per machine (call it on the
    thread that runs the model: timing runs multi-threaded matmuls)."""
    chosen = getattr(model, "_kvstash_projections", None)
    if chosen is None:
        chosen = _choose(list(model.model.layers), model.config.hidden_size)
        model._kvstash_projections = chosen
    return chosen


def _choose(layers: list[torch.nn.Module], hidden: int) -> list[Projections]:
    plain = [Projections(layer) for layer in layers]
    if not layers or not all(fusable(layer) for layer in layers):
        return plain
    built: list[Projections] = []  # the fused weights, made only if timing or the answer needs them

    def fused() -> list[Projections]:
        if not built:
            built.extend(FusedProjections(layer) for layer in layers)
        return built

    try:
        chosen = choose(_what(layers), _timed(lambda: plain, hidden), _timed(fused, hidden), margin=MARGIN)
    except (RuntimeError, AttributeError) as e:  # a torch build without the oneDNN op
        log.debug("oneDNN projections unavailable: %s", e)
        return plain
    log.debug("decoder projections through %s", "oneDNN, fused" if chosen else "the modules")
    if not chosen:
        return plain
    for layer, f in zip(layers, fused(), strict=True):  # the modules now read the fused weights: nothing held twice
        _share(layer.self_attn, ("q_proj", "k_proj", "v_proj"), f.qkv_w)
        _share(layer.mlp, ("gate_proj", "up_proj"), f.gate_up_w)
    return fused()


def _what(layers: list[torch.nn.Module]) -> str:
    """What the choice depends on: the layer count and the weights' shapes and dtype."""
    a, m = layers[0].self_attn, layers[0].mlp
    shapes = ",".join("x".join(map(str, x.weight.shape)) for x in (a.q_proj, a.k_proj, a.o_proj, m.gate_proj))
    dtype = str(a.q_proj.weight.dtype).removeprefix("torch.")
    return f"projections {len(layers)} layers {shapes} {dtype}" + (" packed" if packing() else "")


def _fuse(linears: list[torch.nn.Linear]) -> torch.Tensor:
    return torch.cat([x.weight.detach() for x in linears]).contiguous()  # [sum of outs, in]


def _share(parent: torch.nn.Module, names: tuple[str, ...], fused: torch.Tensor) -> None:
    at = 0
    for name in names:
        linear = getattr(parent, name)
        n = linear.out_features
        linear.weight.data = fused[at : at + n]
        at += n


def _timed(projs: Callable[[], list[Projections]], hidden: int):
    """All layers' projections on ``rows`` random rows (the weights stream from memory as in a real pass)."""
    inputs: dict[int, torch.Tensor] = {}

    def run(rows: int):
        layers = projs()
        dtype = layers[0].attn.q_proj.weight.dtype
        x = inputs.setdefault(rows, torch.randn(rows, hidden, dtype=dtype))
        for p in layers:
            q, _, _ = p.qkv(x)
            p.out(q.contiguous())
            p.mlp(x)

    return run
