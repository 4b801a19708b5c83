"""Layer-by-layer forward pass over an explicit KVCache, using the model's own modules and weights.

The runner exposes the pieces of a decoder layer (``qkv``, ``attend``, ``finish``) so that reuse methods can
recompute chosen tokens against a merged cache; ``forward`` chains them for ordinary prefill and decoding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kvstash.kv import KVCache
from kvstash.rope import Rope, apply_rope

# Called once per layer by ``Runner.forward`` with (layer, q [H, T, D], k_all [KVH, n, D], mask or None):
# how an eviction policy sees the attention of decoding steps (kvstash.evict).
Observer = Callable[[int, torch.Tensor, torch.Tensor, "torch.Tensor | None"], None]


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask by absolute position: a query sees keys at its own or earlier positions.

    q_pos: [Tq]; k_pos: [n] or [KVH, n] -> [Tq, n] or [KVH, Tq, n] (True = attend).
    """
    return k_pos.unsqueeze(-2) <= q_pos.unsqueeze(-1)


def biased_mask(mask: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A boolean mask as an additive float mask carrying a per-key logit bias (``KVCache.bias``).

    mask: [Tq, n] or [KVH, Tq, n]; bias: [n] or [KVH, n] -> float32, -inf where ``mask`` is False.
    """
    return bias.unsqueeze(-2).expand(mask.shape).masked_fill(~mask, float("-inf"))


class Runner:
    """Runs a Llama-family *ForCausalLM one decoder layer at a time (batch size 1)."""

    def __init__(self, model: torch.nn.Module):
        cfg = model.config
        self.model = model
        self.layers = model.model.layers
        self.num_layers = len(self.layers)
        self.num_heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.dtype = next(model.parameters()).dtype
        self.rope = Rope.from_model(model)

    def new_cache(self, capacity: int = 256) -> KVCache:
        return KVCache(self.num_layers, self.kv_heads, self.head_dim, self.dtype, capacity)

    # --- the pieces of one decoder layer -------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.embed_tokens(ids)  # [T] -> [T, hidden]

    def qkv(self, layer: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Normed projections with rotary applied. h: [T, hidden] -> q [H, T, D], k, v [KVH, T, D]."""
        attn = self.layers[layer].self_attn
        x = self.layers[layer].input_layernorm(h)
        t = h.shape[0]
        q = attn.q_proj(x).view(t, self.num_heads, self.head_dim).transpose(0, 1)
        k = attn.k_proj(x).view(t, self.kv_heads, self.head_dim).transpose(0, 1)
        v = attn.v_proj(x).view(t, self.kv_heads, self.head_dim).transpose(0, 1)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Softmax attention. q: [H, Tq, D]; k, v: [KVH, n, D]; mask: [Tq, n] or [KVH, Tq, n], boolean (True =
        attend) or additive float (:func:`biased_mask`) -> [Tq, H*D]."""
        if mask is not None and mask.dim() == 3:  # per-head positions after eviction
            mask = mask.repeat_interleave(self.num_heads // self.kv_heads, dim=0)
        if mask is not None and mask.is_floating_point():
            mask = mask.to(q.dtype)  # some SDPA kernels want a float mask in the query's dtype
        out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, enable_gqa=True)
        return out[0].transpose(0, 1).reshape(q.shape[1], -1)

    def finish(self, layer: int, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Output projection, residual, MLP, residual. h, result: [T, hidden]."""
        block = self.layers[layer]
        h = h + block.self_attn.o_proj(attn_out)
        return h + block.mlp(block.post_attention_layernorm(h))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.model.norm(h)).float()  # [T, hidden] -> [T, vocab]

    # --- whole passes ------------------------------------------------------------------------------------
    def layer_mask(self, cache: KVCache, layer: int, q_pos: torch.Tensor) -> torch.Tensor | None:
        """Causal mask of queries at ``q_pos`` over one layer's cache; float with the cache's logit bias if it
        has one, None if every key is visible and unbiased."""
        _, _, k_pos = cache.layer(layer)
        bias = cache.layer_bias(layer)  # [KVH, n] or None
        if cache.uniform:
            k_pos, bias = k_pos[0], None if bias is None else bias[0]
        mask = causal_mask(q_pos, k_pos)
        if bias is not None:
            return biased_mask(mask, bias)
        return None if bool(mask.all()) else mask

    @torch.inference_mode()
    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        all_logits: bool = False,
        observer: Observer | None = None,
    ):
        """Append tokens ``ids`` [T] at ``positions`` [T] to ``cache`` and return logits.

        Changes ``cache``: its length grows by T and every layer's new slots are written. ``observer``, if
        given, sees each layer's queries, keys and mask (None: every key visible).
        Returns [T, vocab] if ``all_logits`` else [vocab] for the last token.
        """
        cos, sin = self.rope.cos_sin(positions)
        start = cache.append(positions)
        shared = cache.uniform and cache.bias is None  # one mask serves every layer
        mask = self.layer_mask(cache, 0, positions) if shared else None
        h = self.embed(ids)
        for i in range(self.num_layers):
            q, k, v = self.qkv(i, h, cos, sin)
            cache.write(i, start, k, v)
            k_all, v_all, _ = cache.layer(i)
            m = mask if shared else self.layer_mask(cache, i, positions)
            if observer is not None:
                observer(i, q, k_all, m)
            h = self.finish(i, h, self.attend(q, k_all, v_all, m))
        return self.logits(h) if all_logits else self.logits(h[-1:])[0]
