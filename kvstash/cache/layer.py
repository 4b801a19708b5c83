"""One layer's growing decode-time K/V, held as KIVI groups plus a full-precision residual of recent tokens.

The first ``sinks`` tokens may also stay in full precision: the first token is an attention sink whose key
is an outlier in every channel, so in a per-channel key group it costs its group-mates their precision and
its own error is amplified by the attention it gets (KVQuant keeps it in fp16 too). With SmolLM2-135M at
4 bits, keeping it cut the teacher-forced answer KL 3-5x on needle prompts.

Keys are quantized per channel, in groups of G consecutive tokens, so a key group can only be quantized once
G tokens exist; until then (and for the ``residual`` most recent tokens always) tokens stay in full
precision. Quantized tokens never change again, so appending is cheap and deterministic: the result does
not depend on how the tokens were split across ``append`` calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstash.cache.kivi import SUPPORTED_BITS, Quantized, dequantize, quantize

FP16_BITS = 16  # "bits" of a cache that keeps every token in fp16 and quantizes nothing
KV_BITS = (*SUPPORTED_BITS, FP16_BITS)


@dataclass(frozen=True)
class KVQuantConfig:
    """How a decode cache quantizes: ``bits`` per code (16: fp16, nothing quantized), ``group_size`` G,
    ``residual`` R recent tokens kept exact (None: R = G), ``sinks`` first tokens kept exact.
    ``key_bits`` / ``value_bits`` override ``bits`` for keys or values (a mixed-precision layer,
    :mod:`kvstash.kv_alloc`); None: ``bits``."""

    bits: int = 4
    group_size: int = 32
    residual: int | None = None
    sinks: int = 0
    key_bits: int | None = None
    value_bits: int | None = None

    def __post_init__(self) -> None:
        if self.bits not in KV_BITS:
            raise ValueError(f"--kv-bits must be one of {KV_BITS}, got {self.bits!r}")
        for name in ("key_bits", "value_bits"):
            b = getattr(self, name)
            if b is None or b == self.bits:
                object.__setattr__(self, name, self.bits)
            elif self.bits == FP16_BITS or b not in SUPPORTED_BITS:
                raise ValueError(f"{name} must be one of {SUPPORTED_BITS} in a quantized cache, got {b!r}")
        if self.group_size < 4 or self.group_size % 4:
            # a whole token group then packs into whole bytes, so groups can be concatenated as bytes
            raise ValueError(f"group_size must be a positive multiple of 4, got {self.group_size}")
        if self.residual is None:
            object.__setattr__(self, "residual", self.group_size)
        if self.residual < 0:
            raise ValueError(f"residual must be >= 0 tokens, got {self.residual}")
        if self.sinks < 0:
            raise ValueError(f"sinks must be >= 0 tokens, got {self.sinks}")

    @classmethod
    def for_bits(cls, bits: int) -> KVQuantConfig:
        """The decode cache's defaults: G = 64 at 4 bits (as the kivi4 codec: 4.5 bits per element with its
        fp16 scale and zero, instead of 5 at G = 32), G = 32 otherwise; R = 32 recent tokens; the first token
        kept exact."""
        return cls(bits=bits, group_size=64 if bits == 4 else 32, residual=32, sinks=1)


class QuantizedLayerCache:
    """K/V of one layer, ``[kv_heads, tokens, head_dim]``: quantized token groups + a full-precision tail.

    Invariant: the first ``sinks`` tokens are kept apart, exact; of the others, the residual holds the newest
    ``R <= r < R + G`` (fewer while fewer exist) and everything older is quantized, in whole groups of G
    tokens, in order. At 16 bits the residual holds every token after the sinks.
    """

    def __init__(self, config: KVQuantConfig | None = None) -> None:
        self.config = config or KVQuantConfig()
        self._blocks: list[tuple[Quantized, Quantized]] = []  # (keys, values), each [n_groups, heads, G, dim]
        self._k_sink: torch.Tensor | None = None  # [kv_heads, <= sinks, head_dim]: the first tokens, exact
        self._v_sink: torch.Tensor | None = None
        # the residual: the first r slots of growable buffers (appending one token copies one token, which
        # matters at 16 bits, where every token stays here)
        self._k_buf: torch.Tensor | None = None  # [kv_heads, capacity, head_dim], dtype as appended
        self._v_buf: torch.Tensor | None = None  # [kv_heads, capacity, head_dim]
        self._r = 0  # tokens in the residual
        self._num_quantized = 0  # tokens held in _blocks

    @property
    def num_tokens(self) -> int:
        return self.num_sinks + self._num_quantized + self.num_residual

    @property
    def num_sinks(self) -> int:
        return 0 if self._k_sink is None else self._k_sink.shape[1]

    @property
    def num_quantized(self) -> int:
        return self._num_quantized

    @property
    def num_residual(self) -> int:
        return self._r

    @property
    def _k_res(self) -> torch.Tensor | None:
        return None if self._k_buf is None else self._k_buf[:, : self._r]

    @property
    def _v_res(self) -> torch.Tensor | None:
        return None if self._v_buf is None else self._v_buf[:, : self._r]

    @property
    def residual(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The full-precision (keys, values) of the newest tokens, or None before the first append."""
        return None if self._k_buf is None else (self._k_res, self._v_res)

    @property
    def nbytes(self) -> int:
        """Bytes actually held: packed codes, fp16 scales/zeros, and the residual's tokens (not the spare
        capacity of its buffers)."""
        held = sum(k.nbytes + v.nbytes for k, v in self._blocks)
        if self._k_sink is not None:
            held += 2 * self._k_sink.numel() * self._k_sink.element_size()
        if self._k_res is not None:
            held += 2 * self._k_res.numel() * self._k_res.element_size()
        return held

    def append(self, k: torch.Tensor, v: torch.Tensor) -> int:
        """Add ``t`` new tokens (k, v: ``[kv_heads, t, head_dim]``); quantizes the oldest residual tokens in
        whole groups once more than ``R + G - 1`` are waiting (never at 16 bits). Returns how many tokens this
        call quantized (one new block, see :meth:`last_block`). Raises ValueError on a shape mismatch."""
        if k.shape != v.shape or k.dim() != 3:
            raise ValueError(
                f"append takes k and v of one [kv_heads, tokens, head_dim] shape, got {tuple(k.shape)} "
                f"and {tuple(v.shape)}"
            )
        if self._k_buf is None:
            self._k_buf, self._v_buf = k.new_empty(k.shape[0], 0, k.shape[2]), v.new_empty(v.shape[0], 0, v.shape[2])
        elif k.shape[0] != self._k_buf.shape[0] or k.shape[2] != self._k_buf.shape[2]:
            raise ValueError(
                f"this cache holds {self._k_buf.shape[0]} heads x {self._k_buf.shape[2]} dims, "
                f"got new tokens of shape {tuple(k.shape)}"
            )
        take = min(self.config.sinks - self.num_sinks, k.shape[1])
        if take > 0:
            ks, vs = k[:, :take].clone(), v[:, :take].clone()
            self._k_sink = ks if self._k_sink is None else torch.cat([self._k_sink, ks], dim=1)
            self._v_sink = vs if self._v_sink is None else torch.cat([self._v_sink, vs], dim=1)
            k, v = k[:, take:], v[:, take:]
        r, t = self._r, k.shape[1]
        if r + t > self._k_buf.shape[1]:  # grow (doubling): copies the residual, never the caller's buffers
            cap = max(r + t, 2 * self._k_buf.shape[1])
            k_buf, v_buf = (
                self._k_buf.new_empty(k.shape[0], cap, k.shape[2]),
                self._v_buf.new_empty(v.shape[0], cap, v.shape[2]),
            )
            k_buf[:, :r], v_buf[:, :r] = self._k_buf[:, :r], self._v_buf[:, :r]
            self._k_buf, self._v_buf = k_buf, v_buf
        self._k_buf[:, r : r + t], self._v_buf[:, r : r + t] = k, v
        self._r = r + t
        return self._flush()

    def _flush(self) -> int:
        g, r = self.config.group_size, self.config.residual
        n_groups = (self.num_residual - r) // g
        if n_groups <= 0 or self.config.bits == FP16_BITS:
            return 0
        n = n_groups * g
        heads, _, dim = self._k_res.shape
        # [heads, n, dim] -> [n_groups, heads, G, dim]: one key group per (group, head, channel)
        k_old = self._k_res[:, :n].reshape(heads, n_groups, g, dim).transpose(0, 1)
        v_old = self._v_res[:, :n].reshape(heads, n_groups, g, dim).transpose(0, 1)
        cfg = self.config
        self._blocks.append((quantize(k_old, cfg.key_bits, g, axis=2), quantize(v_old, cfg.value_bits, g, axis=3)))
        # new buffers of just the remaining tokens, so the quantized ones' memory is released
        self._k_buf = self._k_buf[:, n : self._r].clone()
        self._v_buf = self._v_buf[:, n : self._r].clone()
        self._r -= n
        self._num_quantized += n
        return n

    def keep_recent(self, n: int, keep: list[int]) -> None:
        """Of the last ``n`` tokens appended, keep only those at the offsets ``keep`` (ascending), in order: a
        speculative step's accepted rows. They must still be in the full-precision residual (ValueError if not)."""
        if n > self.num_residual:
            raise ValueError(f"only the residual's {self.num_residual} newest tokens can be dropped, not {n}")
        first = self._r - n
        idx = torch.tensor([first + i for i in keep], dtype=torch.long)
        m = len(keep)
        self._k_buf[:, first : first + m] = self._k_buf[:, idx]
        self._v_buf[:, first : first + m] = self._v_buf[:, idx]
        self._r = first + m

    def last_block(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (keys, values) ``[kv_heads, t, head_dim]`` of the tokens the latest flush quantized, as
        dequantized. Raises ValueError while nothing is quantized."""
        if not self._blocks:
            raise ValueError("nothing is quantized yet")
        k, v = self._blocks[-1]
        return _dequantize_blocks([k]), _dequantize_blocks([v])

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (keys, values) ``[kv_heads, tokens, head_dim]``: the sinks, dequantized groups, then the
        residual. Changes nothing. Raises ValueError before the first append."""
        if self._k_res is None:
            raise ValueError("the cache is empty: append tokens before materialize()")
        k_parts, v_parts = [], []
        if self._k_sink is not None:
            k_parts.append(self._k_sink.float())
            v_parts.append(self._v_sink.float())
        if self._blocks:
            k_parts.append(_dequantize_blocks([k for k, _ in self._blocks]))
            v_parts.append(_dequantize_blocks([v for _, v in self._blocks]))
        k_parts.append(self._k_res.float())
        v_parts.append(self._v_res.float())
        return torch.cat(k_parts, dim=1), torch.cat(v_parts, dim=1)


def _dequantize_blocks(blocks: list[Quantized]) -> torch.Tensor:
    """Blocks of ``[n_groups_i, heads, G, dim]`` -> float32 ``[heads, sum(n_groups_i) * G, dim]``, in one
    dequantize (each block's codes fill whole bytes, so packed bytes concatenate)."""
    first = blocks[0]
    n_groups = sum(b.shape[0] for b in blocks)
    merged = Quantized(
        torch.cat([b.data for b in blocks]),
        torch.cat([b.scale for b in blocks]),
        torch.cat([b.zero for b in blocks]),
        (n_groups, *first.shape[1:]),
        first.bits,
        first.group_size,
        first.axis,
    )
    x = dequantize(merged)  # [n_groups, heads, G, dim]
    heads, g, dim = first.shape[1:]
    return x.transpose(0, 1).reshape(heads, n_groups * g, dim)


class HeadwiseLayerCache:
    """One layer's K/V whose KV heads have their own widths (``--kv-alloc mixed``): a
    :class:`QuantizedLayerCache` per head, with the same interface as one. All heads share the layout (G, R,
    sinks), so they hold the same tokens and quantize on the same appends."""

    def __init__(self, configs: list[KVQuantConfig]) -> None:
        if not configs or len({(c.group_size, c.residual, c.sinks, c.bits) for c in configs}) != 1:
            raise ValueError("every head of a layer needs the same group size, residual, sinks and base bits")
        self.heads = [QuantizedLayerCache(c) for c in configs]
        self.config = configs[0]

    @property
    def num_tokens(self) -> int:
        return self.heads[0].num_tokens

    @property
    def num_sinks(self) -> int:
        return self.heads[0].num_sinks

    @property
    def num_quantized(self) -> int:
        return self.heads[0].num_quantized

    @property
    def num_residual(self) -> int:
        return self.heads[0].num_residual

    @property
    def nbytes(self) -> int:
        return sum(h.nbytes for h in self.heads)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> int:
        """As :meth:`QuantizedLayerCache.append`, head ``i`` of k, v ``[kv_heads, t, head_dim]`` to store i."""
        if k.shape != v.shape or k.dim() != 3 or k.shape[0] != len(self.heads):
            raise ValueError(
                f"append takes k and v of one [{len(self.heads)} heads, tokens, head_dim] shape, got "
                f"{tuple(k.shape)} and {tuple(v.shape)}"
            )
        return [h.append(k[i : i + 1], v[i : i + 1]) for i, h in enumerate(self.heads)][0]

    def keep_recent(self, n: int, keep: list[int]) -> None:
        for h in self.heads:
            h.keep_recent(n, keep)

    def last_block(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _cat_heads([h.last_block() for h in self.heads])

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _cat_heads([h.materialize() for h in self.heads])


def _cat_heads(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([k for k, _ in parts]), torch.cat([v for _, v in parts])
