"""Mixed-precision decode cache (``--kv-alloc mixed``): each KV head's keys and values get their own bit width,
chosen by measured sensitivity, for the bytes of uniform 4-bit.

Uniform KIVI spends the same bits on every layer, but the harm is far from uniform. On SmolLM2-135M, quantizing
the keys of layer 18 alone to 4 bits costs about 70% of the answer KL that quantizing everything does, and
two thirds of the 60 key/value tensors cost under 1e-5 each (``benchmarks/quant_ablation.py --per-layer``).

So, after prefill:

1. **Measure** (:func:`sensitivity`): replay the prompt's last ``window`` queries (as SnapKV does) and, for
   every layer, quantize its keys and its values at 2, 4 and 8 bits exactly as the decode cache would. Score
   each (KV head, keys or values, width) by the relative error it causes in the attention output of the
   query heads reading that KV head, ``|o - o'|^2 / |o|^2``. Averaged over a layer's heads at 4 bits, this
   score ranks the 60 layer tensors like their answer KL on needle prompts (Spearman 0.89; the same top six).
2. **Allocate** (:func:`allocate_bits`): promote the tensors (one KV head's keys or values) that gain most
   from 8 bits and pay for each with the two that lose least at 2 bits. All tensors have the same shape and
   group size, so the packed bytes stay exactly those of uniform 4-bit. A trade is made only while its
   measured gain beats its loss. (The 2-bit loss must be measured: extrapolating it from the 4-bit error as
   ``(15/3)^2 = 25x`` demoted a key tensor whose error grows 480x, and on one prompt the answer KL rose 6x
   over uniform.) Per KV head rather than per layer lowers the answer KL further (0.0009 -> 0.0005 on needle
   prompts): a layer's sensitivity often sits in one of its heads.

Every tensor keeps the KIVI layout (keys per channel, values per token, fp16 scale and zero per group of G,
the same sinks and recent window); only its code width changes.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from kvstash.cache.kv import KVCache
from kvstash.cache.layer import KVQuantConfig, QuantizedLayerCache
from kvstash.model.attention import attention_probs, read_values
from kvstash.model.replay import replay_queries
from kvstash.model.runner import Runner

KV_ALLOCS = ("uniform", "mixed")
STEPS = {4: (2, 8)}  # base width -> (demoted, promoted) widths: two demotions pay for one promotion


def allocate_bits(errors: torch.Tensor, base: int = 4) -> torch.Tensor:
    """Bit widths for N equal-size tensors from their measured errors [3, N] at the (demoted, base, promoted)
    widths of ``STEPS[base]`` -> int64 [N] of those widths.

    Tensors go up one step in order of gain ``error(base) - error(hi)``, each paid for by the next
    ``(hi - base) / (base - lo)`` tensors in order of loss ``error(lo) - error(base)`` going down one step, so
    ``sum(bits) == N * base``. Trades stop when the next one's gain no longer beats its loss, or when the two
    orders meet. Pure; ties keep input order (stable sorts).
    """
    if base not in STEPS:
        raise ValueError(f"mixed precision trades around 4 bits (2 and 8 around it); got base {base}")
    if errors.dim() != 2 or errors.shape[0] != 3 or bool((errors < 0).any()) or not bool(errors.isfinite().all()):
        raise ValueError("errors must be a [3, N] tensor (at the low, base and high width) of finite values >= 0")
    lo, hi = STEPS[base]
    per = (hi - base) // (base - lo)  # demotions per promotion
    e_lo, e_base, e_hi = errors
    gain, loss = e_base - e_hi, e_lo - e_base
    promote = torch.sort(gain, descending=True, stable=True).indices.tolist()
    demote = iter(torch.sort(loss, stable=True).indices.tolist())
    bits = torch.full((errors.shape[1],), base, dtype=torch.long)
    for up in promote:
        if bits[up] != base:  # already demoted: the orders met
            break
        down = _take(demote, up, bits, per)
        if len(down) < per or gain[up] <= loss[down].sum():
            break
        bits[up], bits[down] = hi, lo
    return bits


def _take(order, skip: int, bits: torch.Tensor, k: int) -> list[int]:
    """The next ``k`` indices from the iterator ``order`` other than ``skip`` that still have ``skip``'s width
    (the base: promoted tensors are passed over)."""
    out = []
    for j in order:
        if j != skip and bits[j] == bits[skip]:
            out.append(j)
            if len(out) == k:
                break
    return out


@torch.inference_mode()
def sensitivity(
    runner: Runner, cache: KVCache, token_ids, configs: list[KVQuantConfig], window: int = 32
) -> torch.Tensor:
    """Relative attention-output error of quantizing each KV head's keys, and separately its values, as each of
    ``configs`` (a decode-cache layout and width) would, seen by the prompt's last ``window`` queries (the
    query heads that read the KV head): [configs, layers, kv_heads, 2] (keys, values). Every width is
    measured, not extrapolated: at 2 bits the error through the softmax grows 20-500x over 4 bits' depending
    on the layer. ``cache`` is the prompt's cache as prefilled (see :func:`replay_queries`). Changes nothing."""
    errors = torch.zeros(len(configs), cache.layers, cache.kv_heads, 2)
    n = cache.length

    def observe(layer: int, q: torch.Tensor, probs: torch.Tensor, mask: torch.Tensor) -> None:
        k, v, _ = cache.layer(layer)
        v = v.float()
        exact = read_values(probs, v)  # [KVH, G * T, D]
        scale = exact.pow(2).sum(dim=(1, 2)).clamp_min(1e-30)  # [KVH]
        for c, config in enumerate(configs):
            store = QuantizedLayerCache(config)
            store.append(k.half(), v.half())
            kq, vq = store.materialize()  # [KVH, n, D] what the decode cache would read
            errors[c, layer, :, 0] = (read_values(attention_probs(q, kq, mask), v) - exact).pow(2).sum(
                dim=(1, 2)
            ) / scale
            errors[c, layer, :, 1] = (read_values(probs, vq) - exact).pow(2).sum(dim=(1, 2)) / scale

    replay_queries(runner, cache, token_ids, max(0, n - window), n, observe, block=window)
    return errors


def allocate_head_bits(runner: Runner, cache: KVCache, token_ids, bits: int = 4, window: int = 32) -> torch.Tensor:
    """Key and value bits per KV head, [layers, kv_heads, 2], for a decode cache of ``bits`` on average:
    :func:`sensitivity` at the three widths with :meth:`KVQuantConfig.for_bits` layout, then
    :func:`allocate_bits` over all the KV heads' keys and values. ValueError unless ``bits`` is 4."""
    if bits not in STEPS:
        raise ValueError(f"--kv-alloc mixed needs --kv-bits 4 (it trades 2- and 8-bit tensors around 4), got {bits}")
    base = KVQuantConfig.for_bits(bits)
    lo, hi = STEPS[bits]
    widths = [replace(base, key_bits=b, value_bits=b) for b in (lo, bits, hi)]
    errors = sensitivity(runner, cache, token_ids, widths, window)  # [3, L, KVH, 2]
    return allocate_bits(errors.flatten(1), bits).view(errors.shape[1:])
