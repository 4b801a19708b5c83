"""The runner: one loop over the decoder layers, over explicit KV caches, using the model's own modules.

Every pass through the model goes through :meth:`Runner.run`: prefill and decoding (:meth:`Runner.forward`),
blend's partial passes and its question probe, query replay for eviction and bit allocation, and batched steps
over several sequences. Each sequence in a pass is a :class:`Rows`: its new tokens, their positions, the
cache they write to and attend over, and an optional :class:`LayerHook` that may narrow the rows, choose
which of them write, watch the attention, or replace it. Linear layers run once over the rows of every
sequence; attention runs per sequence over its own cache.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

import torch

from kvstash.cache.kv import KVCache
from kvstash.model.attention import attention_mask, sdpa, visible_keys
from kvstash.model.head import Head, lm_head
from kvstash.model.linear import OneDNNLinear
from kvstash.model.projections import FusedProjections, Projections, projections
from kvstash.model.rope import Rope, apply_rope

T = TypeVar("T")
# Work on the model as a generator of passes: it yields the rows of one pass (one Rows per sequence it runs),
# is sent back the final hidden states of that pass, and returns its result. ``Runner.drive`` runs the passes
# one at a time; a scheduler may run them together with other sequences' rows in one batched pass.
Steps = Generator[list["Rows"], list[torch.Tensor], T]


class Selection(NamedTuple):
    """What a hook decides for one sequence at one layer."""

    keep: torch.Tensor | None = None  # [T] bool: rows that go on (None: all); the others leave the pass
    write: torch.Tensor | None = None  # [T'] bool over the kept rows: whose K/V are written (None: all)


class LayerHook:
    """Plug-in points of the layer loop for one sequence; every default does nothing.

    ``select`` runs after the layer's projections, ``observe`` once the layer's keys are in place, ``attend``
    per block of queries instead of the fused kernel (return None to keep the kernel's result), ``done`` once
    the pass has run every layer.
    """

    def select(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Selection | None:
        """q [H, T, D], k, v [KVH, T, D] of this sequence's rows; None keeps every row and writes them all."""
        return None

    def observe(self, layer: int, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> None:
        """q [H, T, D] of the rows, k [KVH, n, D] every cached key, mask as :func:`attention_mask` built it."""

    def attend(self, layer: int, q, k, v, mask) -> torch.Tensor | None:
        """Attention of one block of queries over the keys they can see: q [H, Tb, D], k, v [KVH, m, D], mask
        [Tb, m] or None -> [Tb, H*D], or None for the fused kernel."""
        return None

    def done(self, cache: KVCache) -> None:
        """After the pass's last layer (e.g. evict down to a budget after a decoding step)."""


class Watch(LayerHook):
    """A hook that only watches: ``fn(layer, q, k, mask)`` at every layer (see :meth:`LayerHook.observe`)."""

    def __init__(self, fn: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor | None], None]):
        self.fn = fn

    def observe(self, layer: int, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> None:
        self.fn(layer, q, k, mask)


@dataclass
class Rows:
    """One sequence's new tokens in a pass: ids and positions [T], the cache they go into and attend over."""

    ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64 absolute positions
    cache: KVCache
    slots: torch.Tensor | None = None  # [T] cache slots to write; None: appended to the cache by the pass
    hook: LayerHook | None = None
    write: bool = True  # False: the rows' K/V are already cached (query replay)
    tree: torch.Tensor | None = None  # [T, T] bool: row i may see row j (a draft tree); appended rows only
    # a pass run a few layers at a time (a scheduler's chunked prefill): the layers of this run, [first, last)
    # (None: to the last layer), and ``h`` [T, hidden] the rows' hidden states after layer first - 1 (first > 0)
    first: int = 0
    last: int | None = None
    h: torch.Tensor | None = None
    _mask: tuple | None = field(default=None, repr=False)  # (mask, layer built at) reused while it can be
    _visible: dict = field(default_factory=dict, repr=False)  # block start -> keys it sees, for that mask
    _run: int | None = field(default=None, repr=False)  # first slot when the slots are one run, else None

    def narrow(self, keep: torch.Tensor) -> None:
        self.ids, self.positions, self.slots = self.ids[keep], self.positions[keep], self.slots[keep]
        self._mask, self._run = None, _first_of_run(self.slots)

    def mask(self, layer: int) -> torch.Tensor | None:
        """:func:`attention_mask` of these rows over the cache's layer. In a uniform cache (positions the same in
        every layer) one mask serves every layer whose logit bias equals the layer it was built for."""
        cache = self.cache
        if self._mask is not None and cache.uniform and self._same_bias(self._mask[1], layer):
            return self._mask[0]
        _, _, k_pos = cache.layer(layer)
        mask = attention_mask(self.positions, k_pos, cache.layer_bias(layer), cache.uniform)
        if mask is not None and mask.is_floating_point():
            mask = mask.to(cache.dtype)  # once per mask, not per block: SDPA wants it in the queries' dtype
        if self.tree is not None:
            mask = tree_mask(mask, self.tree, len(self.positions), k_pos.shape[-1])
        self._mask, self._visible = (mask, layer, cache.bias is not None), {}
        return mask

    def _same_bias(self, built: int, layer: int) -> bool:
        bias = self.cache.layer_bias(layer)
        if bias is None or not self._mask[2]:
            return bias is None and not self._mask[2]
        return built == layer or torch.equal(bias, self.cache.layer_bias(built))

    def visible(self, start: int, block: torch.Tensor) -> int:
        """:func:`visible_keys` of the block of queries from ``start`` (a slice of the current mask), remembered
        while the mask is."""
        if start not in self._visible:
            self._visible[start] = visible_keys(block)
        return self._visible[start]


class Runner:
    """Runs a Llama-family *ForCausalLM one decoder layer at a time over explicit caches."""

    def __init__(self, model: torch.nn.Module, block: int = 512):
        cfg = model.config
        self.model = model
        self.layers = model.model.layers
        self.num_layers = len(self.layers)
        self.num_heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.dtype = next(model.parameters()).dtype
        self.rope = Rope.from_model(model)
        self.block = block  # queries per attention call (bounds the [H, block, n] scores)
        # queries per call when the rows are scattered over the cache (blend's chosen tokens): each block reads
        # the keys up to its last row, so smaller blocks skip more of the keys causality hides
        self.scattered_block = max(1, block // 4)
        # cached keys whose attention costs what one row's linear layers cost (QK and PV: 4 * H * D flops a key)
        inner = getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
        weights = 2 * cfg.hidden_size * (self.num_heads + self.kv_heads) * self.head_dim + 3 * cfg.hidden_size * inner
        self.keys_per_row = weights / (2 * self.num_heads * self.head_dim)  # 3072 for SmolLM2-135M

    def row_cost(self, rows: Rows) -> float:
        """What ``rows`` cost through one layer, in rows that read no keys: each row's linear layers plus its
        attention over the keys up to its position (causal), ``1 + (position + 1) / keys_per_row``. A row over
        5K keys costs ~2.6 rows for SmolLM2 (a scheduler's token budget counts this)."""
        n = len(rows.positions)
        return n + (float(rows.positions.sum()) + n) / self.keys_per_row if n else 0.0

    def position_costs(self, positions: torch.Tensor) -> torch.Tensor:
        """:meth:`row_cost` per row: what a row at each of ``positions`` [T] costs through one layer. [T] float
        (blend's ``budget="work"``)."""
        return 1.0 + (positions.to(torch.float32) + 1.0) / self.keys_per_row

    def new_cache(self, capacity: int = 256) -> KVCache:
        return KVCache(self.num_layers, self.kv_heads, self.head_dim, self.dtype, capacity)

    # --- the pieces of one decoder layer -------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.embed_tokens(ids)  # [T] -> [T, hidden]

    def qkv(self, layer: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Normed projections with rotary applied. h: [T, hidden] -> q [H, T, D], k, v [KVH, T, D]."""
        x = self.layers[layer].input_layernorm(h)
        t = h.shape[0]
        q, k, v = self.projections()[layer].qkv(x)
        q = q.view(t, self.num_heads, self.head_dim).transpose(0, 1)
        k = k.view(t, self.kv_heads, self.head_dim).transpose(0, 1)
        v = v.view(t, self.kv_heads, self.head_dim).transpose(0, 1)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Softmax attention (:func:`sdpa`). q: [H, Tq, D]; k, v: [KVH, n, D]; mask: [Tq, n] or [KVH, Tq, n],
        boolean (True = attend) or additive float (:func:`biased_mask`) -> [Tq, H*D]."""
        return sdpa(q, k, v, mask)

    def finish(self, layer: int, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Output projection, residual, MLP, residual. h, result: [T, hidden]."""
        proj = self.projections()[layer]
        h = h + proj.out(attn_out)
        return h + proj.mlp(self.layers[layer].post_attention_layernorm(h))

    @torch.inference_mode()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head()(self.model.model.norm(h)).float()  # [T, hidden] -> [T, vocab]

    def head(self) -> Head:
        """The LM head, its kernel chosen by timing on first use (:func:`lm_head`, remembered on the module)."""
        return lm_head(self.model.lm_head)

    def projections(self) -> list[Projections]:
        """Each layer's linear layers, fused through oneDNN or the modules, chosen by timing on first use
        (:func:`projections`, remembered on the model)."""
        return projections(self.model)

    def kernels(self) -> dict:
        """What the linear layers run on (chosen on first use: call it after :meth:`choose_kernels`, on the
        thread that runs the model): ``projections`` ``"torch"`` (the modules) or ``"onednn fused"``, ``head``
        ``"torch"`` or ``"onednn"``, each with ``" packed"`` when oneDNN runs from its packed copies, and
        ``packed_mb``, the memory those copies add."""
        projs, head = self.projections(), self.head()
        fused = [p for p in projs if isinstance(p, FusedProjections)]
        layers_packed = sum(p.packed_bytes for p in fused)
        head_packed = head.packed_bytes if isinstance(head, OneDNNLinear) else 0
        return {
            "projections": ("onednn fused" + (" packed" if layers_packed else "")) if fused else "torch",
            "head": ("onednn" + (" packed" if head_packed else "")) if isinstance(head, OneDNNLinear) else "torch",
            "packed_mb": round((layers_packed + head_packed) / 2**20, 1),
        }

    def choose_kernels(self) -> None:
        """Time the linear layers' kernels now (:meth:`head`, :meth:`projections`), about a second, rather than
        in the first request. Call it on the thread that will run the model (a server's worker): timing runs
        multi-threaded matmuls, and OpenMP's threads belong to the thread that starts them."""
        self.head()
        self.projections()

    # --- the layer loop --------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, batch: Sequence[Rows]) -> list[torch.Tensor]:
        """Run every sequence's rows through its layers (all of them, or ``[rows.first, rows.last)``):
        projections and MLP over the rows of every sequence in the layer at once, attention per sequence over
        its own cache. Changes the caches: rows with ``slots=None`` are appended first, and each layer writes
        the rows' K/V (as their hooks select). Returns each sequence's hidden states [T', hidden] after its last
        layer, of the rows still in the pass (after the model's last layer: before the final norm, see
        :meth:`logits`)."""
        for rows in batch:
            if rows.slots is None:
                start = rows.cache.append(rows.positions)
                rows.slots, rows._run = torch.arange(start, start + len(rows.positions)), start
            else:
                rows._run = _first_of_run(rows.slots)
        hs = [self.embed(rows.ids) if rows.h is None else rows.h for rows in batch]
        rope = [self.rope.cos_sin(rows.positions) for rows in batch]
        plain = [_one_plain_token(rows) for rows in batch]
        ends = [self.num_layers if rows.last is None else rows.last for rows in batch]
        whole = all(rows.first == 0 and end == self.num_layers for rows, end in zip(batch, ends, strict=True))
        for layer in range(min(rows.first for rows in batch), max(ends)):
            live = range(len(batch)) if whole else [i for i, r in enumerate(batch) if r.first <= layer < ends[i]]
            if not any(len(batch[i].positions) for i in live):
                continue  # every row in this layer has left the pass (a probe that stops early)
            cos, sin = _cat([rope[i][0] for i in live]), _cat([rope[i][1] for i in live])
            q, k, v = self.qkv(layer, _cat([hs[i] for i in live]), cos, sin)
            outs, offset = [], 0
            for i in live:
                rows, t = batch[i], len(batch[i].positions)
                qi, ki, vi = q[:, offset : offset + t], k[:, offset : offset + t], v[:, offset : offset + t]
                offset += t
                if plain[i]:
                    outs.append(self._attend_token(layer, rows, qi, ki, vi))
                    continue
                qi, ki, vi, hs[i], rope[i] = self._select(layer, rows, qi, ki, vi, hs[i], rope[i])
                outs.append(self._attend_rows(layer, rows, qi))
            h = self.finish(layer, _cat([hs[i] for i in live]), _cat(outs))
            parts = h.split([len(batch[i].positions) for i in live]) if len(live) > 1 else [h]
            for i, part in zip(live, parts, strict=True):
                hs[i] = part
        for rows, end in zip(batch, ends, strict=True):
            if rows.hook is not None and end == self.num_layers:
                rows.hook.done(rows.cache)
        return hs

    def _select(self, layer: int, rows: Rows, q, k, v, h, rope):
        """Apply the hook's selection to one sequence's rows, then write their K/V into its cache."""
        sel = rows.hook.select(layer, q, k, v) if rows.hook is not None else None
        write = None
        if sel is not None:
            if sel.keep is not None:
                keep = sel.keep
                rows.narrow(keep)
                q, k, v, h, rope = q[:, keep], k[:, keep], v[:, keep], h[keep], (rope[0][keep], rope[1][keep])
            write = sel.write
        if rows.write:
            slots = rows.slots if write is None else rows.slots[write]
            kw, vw = (k, v) if write is None else (k[:, write], v[:, write])
            if write is None and rows._run is not None:
                rows.cache.write(layer, rows._run, kw, vw)
            else:
                rows.cache.write_slots(layer, slots, kw, vw)
        return q, k, v, h, rope

    def _attend_rows(self, layer: int, rows: Rows, q: torch.Tensor) -> torch.Tensor:
        """One sequence's attention over its cache, in blocks of ``self.block`` queries; each block reads only
        the keys up to the last one it may see (the keys after it are hidden from the whole block, so leaving
        them out changes only the cost). q: [H, T, D] -> [T, H*D]."""
        if not len(rows.positions):
            return q.new_zeros(0, q.shape[0] * q.shape[2])
        k_all, v_all, _ = rows.cache.layer(layer)
        mask = rows.mask(layer)
        hook = rows.hook
        if hook is not None:
            hook.observe(layer, q, k_all, mask)
        if mask is not None and mask.dim() == 3:  # per-head positions: one call, every key
            return self._attend_block(layer, hook, q, k_all, v_all, mask)
        outs, size = [], self.block if rows._run is not None else self.scattered_block
        for s in range(0, q.shape[1], size):
            m = None if mask is None else mask[s : s + size]
            n = k_all.shape[1] if m is None else rows.visible(s, m)
            m = None if m is None else m[:, :n]
            outs.append(self._attend_block(layer, hook, q[:, s : s + size], k_all[:, :n], v_all[:, :n], m))
        return _cat(outs)

    def _attend_token(self, layer: int, rows: Rows, q, k, v) -> torch.Tensor:
        """:meth:`_select` then :meth:`_attend_rows` for one decoding row with no hook and no draft tree, without
        their general machinery (the same calls on the same tensors): K/V written at its slot, attention over the
        keys it can see. q: [H, 1, D]; k, v: [KVH, 1, D] -> [1, H*D]."""
        cache = rows.cache
        cache.write(layer, rows._run, k, v)
        k_all, v_all, _ = cache.layer(layer)
        mask = rows.mask(layer)
        if mask is not None and mask.dim() == 2:
            n = rows.visible(0, mask)
            k_all, v_all, mask = k_all[:, :n], v_all[:, :n], mask[:, :n]
        return self.attend(q, k_all, v_all, mask)

    def _attend_block(self, layer: int, hook: LayerHook | None, q, k, v, mask) -> torch.Tensor:
        out = hook.attend(layer, q, k, v, mask) if hook is not None else None
        return self.attend(q, k, v, mask) if out is None else out

    # --- whole passes ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        all_logits: bool = False,
        hook: LayerHook | None = None,
    ) -> torch.Tensor:
        """Append tokens ``ids`` [T] at ``positions`` [T] to ``cache`` and return logits.

        Changes ``cache``: its length grows by T and every layer's new slots are written. ``hook``, if given,
        sees each layer's queries, keys and mask (:meth:`LayerHook.observe`).
        Returns [T, vocab] if ``all_logits`` else [vocab] for the last token.
        """
        (h,) = self.run([Rows(ids, positions, cache, hook=hook)])
        return self.logits(h) if all_logits else self.logits(h[-1:])[0]

    def prefill(self, cache: KVCache, ids, start_pos: int, chunk: int) -> torch.Tensor:
        """Plain prefill of ``ids`` from ``start_pos`` onto ``cache``, ``chunk`` tokens per pass (bounds
        attention memory); returns the last token's logits [vocab]. ValueError for no tokens."""
        return self.drive(self.prefill_steps(cache, ids, start_pos, chunk))

    def prefill_steps(self, cache: KVCache, ids, start_pos: int, chunk: int) -> Steps[torch.Tensor]:
        """:meth:`prefill` as steps: yields one pass of ``chunk`` tokens at a time (see :data:`Steps`)."""
        ids_t = torch.as_tensor(ids, dtype=torch.long)
        if not len(ids_t):
            raise ValueError("nothing to prefill: the token list is empty")
        for s in range(0, len(ids_t), chunk):
            part = ids_t[s : s + chunk]
            (h,) = yield [Rows(part, torch.arange(start_pos + s, start_pos + s + len(part)), cache)]
        return self.logits(h[-1:])[0]

    def drive(self, steps: Steps[T]) -> T:
        """Run every pass ``steps`` asks for, alone, and return what it returns."""
        try:
            batch = next(steps)
            while True:
                batch = steps.send(self.run(batch))
        except StopIteration as done:
            return done.value


def tree_mask(mask: torch.Tensor | None, tree: torch.Tensor, t: int, n: int) -> torch.Tensor:
    """``mask`` (as :func:`attention_mask` built it for ``t`` rows appended last to ``n`` keys; None: all
    visible) with the last ``t`` keys limited to what ``tree`` [t, t] lets each row see."""
    if mask is None:
        mask = torch.ones(t, n, dtype=torch.bool)
    mask = mask.clone()
    tail = mask[..., n - t :]
    if mask.dtype == torch.bool:
        tail &= tree
    else:
        tail.masked_fill_(~tree, float("-inf"))
    return mask


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _one_plain_token(rows: Rows) -> bool:
    """One row (a decoding step), no hook, no draft tree, written to the slot appended for it."""
    return len(rows.positions) == 1 and rows.hook is None and rows.tree is None and rows.write and rows._run is not None


def _first_of_run(slots: torch.Tensor) -> int | None:
    """The first slot if ``slots`` are consecutive ascending slots (one write of a block), else None."""
    n = len(slots)
    if n and int(slots[-1]) - int(slots[0]) == n - 1 and bool((slots.diff() == 1).all()):
        return int(slots[0])
    return None
