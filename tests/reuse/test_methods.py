"""Reuse methods: exact where they claim to be (prefix, blend r=1), naive where blend r=0, honest accounting."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kvstash.prompt import Segment
from kvstash.reuse import make_method
from kvstash.reuse.blend import (
    AUTO_DEVIATION,
    AUTO_MAX,
    SPANS,
    BlendConfig,
    BlendReuse,
    CacheBlendReuse,
    question_focus,
    recency_focus,
)
from kvstash.reuse.full import FullPrefill
from kvstash.reuse.layout import lay_out
from kvstash.reuse.partial import NaiveReuse
from kvstash.reuse.prefix import PrefixReuse, exact_head
from kvstash.reuse.report import PrefillReport
from kvstash.reuse.source import ChunkSource

DOCS = [
    "Marie Curie discovered polonium and radium together with Pierre Curie in Paris.",
    "The Danube flows through Vienna, Bratislava, Budapest and Belgrade into the Black Sea.",
    "The secret code of the blue project is 4417. Nobody else knows it.",
]


QUESTION = Segment("What is the secret code of the blue project?", "user")


@pytest.fixture()
def source(engine):
    """A fresh fp32 store per test, so exactness is not blurred by fp16 storage."""
    return ChunkSource.open(engine.runner, engine.lm.fingerprint, "ram:512MiB", "fp32")


def _plan(engine, order=(0, 1, 2)):
    return engine.plan([Segment(DOCS[i]) for i in order] + [QUESTION])


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def _paired(engine, source, configs, order=(0, 2, 1), cls=BlendReuse):
    """Blend methods from ``configs`` and their prefills of one plan, chunks cached at other positions first."""
    plan = _plan(engine, order)
    NaiveReuse().prefill(engine.runner, _plan(engine), source)
    methods = [cls(c) for c in configs]
    return plan, methods, [m.prefill(engine.runner, plan, source) for m in methods]


def test_blend_ratio_one_equals_full_prefill(engine, source):
    plan = _plan(engine, (2, 0, 1))
    full = FullPrefill().prefill(engine.runner, plan)
    NaiveReuse().prefill(engine.runner, _plan(engine), source)  # chunks cached at other positions
    pre = BlendReuse(BlendConfig(ratio=1.0)).prefill(engine.runner, plan, source)
    assert pre.report.reused_tokens > 0  # the chunks did come from the store
    assert _max_diff(pre.last_logits, full.last_logits) < 1e-3
    assert _max_diff(pre.cache.keys, full.cache.keys) < 1e-3


def test_a_document_repeated_in_one_prompt_is_looked_up_once(engine, source):
    """The same passage twice (retrievers return duplicates): computed once on a miss, loaded once on a hit,
    placed at both positions; blend r=1 still equals full prefill."""
    plan = _plan(engine, (2, 0, 2))
    docs = [i for i, seg in enumerate(plan.segments) if seg.kind == "document"]
    segs = [plan.segments[i] for i in docs]
    cold, warm = PrefillReport.for_plan("blend", plan), PrefillReport.for_plan("blend", plan)
    first = engine.runner.drive(source.standalone(segs, cold))
    assert cold.misses == 2 and first[0] is first[2]  # computed once, shared
    second = engine.runner.drive(source.standalone(segs, warm))
    assert warm.misses == 0 and warm.tier_hits == {"ram": 2} and second[0] is second[2]
    again = BlendReuse(BlendConfig(ratio=1.0)).prefill(engine.runner, plan, source)
    for i in docs:
        rep = again.report.segments[i]
        assert (rep.tier, rep.reused) == ("ram", len(plan.segments[i].token_ids))
    full = FullPrefill().prefill(engine.runner, plan)
    assert _max_diff(again.last_logits, full.last_logits) < 1e-3


def test_blend_ratio_zero_equals_naive(engine, source):
    plan = _plan(engine, (1, 2, 0))
    naive = NaiveReuse().prefill(engine.runner, plan, source)
    blend0 = BlendReuse(BlendConfig(ratio=0.0)).prefill(engine.runner, plan, source)
    full = FullPrefill().prefill(engine.runner, plan)
    assert _max_diff(blend0.last_logits, naive.last_logits) < 1e-3
    assert _max_diff(naive.last_logits, full.last_logits) > 0.1  # naive is an approximation


def test_all_chunks_an_exact_cached_prefix_gives_prefix_result(engine, source):
    plan = _plan(engine)
    first = PrefixReuse().prefill(engine.runner, plan, source)  # computes and caches every leading segment
    assert first.report.reused_tokens == 0
    again = PrefixReuse().prefill(engine.runner, plan, source)
    blend = BlendReuse(BlendConfig(ratio=0.15)).prefill(engine.runner, plan, source)
    user_and_glue = sum(len(s.token_ids) for s in plan.segments if s.kind == "user") + len(plan.segments[-1].token_ids)
    assert again.report.recomputed_tokens == user_and_glue
    assert blend.report.recomputed_tokens == user_and_glue
    assert _max_diff(again.last_logits, first.last_logits) < 1e-4
    assert _max_diff(blend.last_logits, again.last_logits) < 1e-4


def test_blend_recomputes_the_requested_share_and_reports_it(engine, source):
    plan = _plan(engine, (2, 1, 0))
    NaiveReuse().prefill(engine.runner, _plan(engine), source)
    pre = BlendReuse(BlendConfig(ratio=0.3)).prefill(engine.runner, plan, source)
    docs = [s for s in pre.report.segments if s.kind == "document"]
    reused = sum(s.reused for s in docs)
    assert reused == sum(s.tokens for s in docs) and all(s.tier == "ram" for s in docs)
    assert sum(s.recomputed for s in docs) == round(0.3 * reused)
    new = sum(s.tokens for s in pre.report.segments if s.kind in ("user",)) + len(plan.segments[-1].token_ids)
    assert pre.report.recomputed_tokens == round(0.3 * reused) + new
    assert pre.report.tier_hits["ram"] >= 3


def test_blend_moves_toward_full_and_answers(engine, source):
    plan = _plan(engine, (2, 0, 1))
    full = FullPrefill().prefill(engine.runner, plan)
    NaiveReuse().prefill(engine.runner, _plan(engine), source)
    err = {
        r: _max_diff(
            BlendReuse(BlendConfig(ratio=r)).prefill(engine.runner, plan, source).last_logits, full.last_logits
        )
        for r in (0.0, 0.5, 1.0)
    }
    assert err[1.0] < err[0.5] < err[0.0]


def test_question_focus_points_at_the_passage_the_question_asks_about(engine, source):
    plan = _plan(engine, (0, 2, 1))
    NaiveReuse().prefill(engine.runner, _plan(engine), source)
    method = BlendReuse(BlendConfig(ratio=0.2, query_share=1.0))
    pre = method.prefill(engine.runner, plan, source)
    docs = [i for i, s in enumerate(plan.segments) if s.kind == "document"]
    recomputed = {i: pre.report.segments[i].recomputed for i in docs}
    reused = sum(plan.segments[i].end - plan.segments[i].start for i in docs)
    assert sum(recomputed.values()) == round(0.2 * reused)  # the budget is the same as plain blend's
    assert recomputed[docs[1]] == max(recomputed.values())  # the "secret code" passage gets the most
    plain = CacheBlendReuse(BlendConfig(ratio=0.2)).prefill(engine.runner, plan, source)
    assert plain.report.segments[docs[1]].recomputed < recomputed[docs[1]]  # by deviation alone it gets fewer


def test_question_focus_keeps_the_anchors(engine, source):
    plan = _plan(engine, (2, 0, 1))
    full = FullPrefill().prefill(engine.runner, plan)
    NaiveReuse().prefill(engine.runner, _plan(engine), source)
    naive = NaiveReuse().prefill(engine.runner, plan, source)
    one = BlendReuse(BlendConfig(ratio=1.0, query_share=0.5)).prefill(engine.runner, plan, source)
    zero = BlendReuse(BlendConfig(ratio=0.0, query_share=0.5)).prefill(engine.runner, plan, source)
    assert _max_diff(one.last_logits, full.last_logits) < 1e-3
    assert _max_diff(zero.last_logits, naive.last_logits) < 1e-3
    with pytest.raises(ValueError, match="query_share"):
        BlendConfig(query_share=1.5)


def test_quality_gate_recomputes_whole_chunks(engine, source):
    plan = _plan(engine, (1, 0, 2))
    full = FullPrefill().prefill(engine.runner, plan)
    NaiveReuse().prefill(engine.runner, _plan(engine), source)
    fired = BlendReuse(BlendConfig(ratio=0.0, gate=1e-9)).prefill(engine.runner, plan, source)
    assert fired.report.gate_fired == 3  # every document chunk exceeded the tiny threshold
    assert _max_diff(fired.last_logits, full.last_logits) < 1e-3
    quiet = BlendReuse(BlendConfig(ratio=0.0, gate=1e9)).prefill(engine.runner, plan, source)
    assert quiet.report.gate_fired == 0


def test_make_method_parses_specs_and_rejects_bad_ones():
    assert make_method("blend:0.3").cfg.ratio == 0.3
    assert make_method("blend", ratio=0.2, check_layer=2).cfg.check_layer == 2
    assert make_method("prefix").name == "prefix" and make_method("naive").name == "naive"
    assert make_method("blend").cfg.query_share == 0.75  # question-focused by default
    plain = make_method("cacheblend:0.2")
    assert plain.name == "cacheblend" and plain.cfg.ratio == 0.2 and plain.cfg.query_share == 0.0
    assert plain.cfg.stale_bias == 0.0 and make_method("blend").cfg.stale_bias == -0.25
    assert make_method("blend", stale_bias=0.0).cfg.stale_bias == 0.0
    with pytest.raises(ValueError, match="use blend with --query-share"):
        make_method("cacheblend", query_share=0.9)
    with pytest.raises(ValueError, match="no stale bias"):
        make_method("cacheblend", stale_bias=-0.5)
    for bad, match in [
        ("blend:abc", "number"),
        ("magic", "unknown reuse"),
        ("prefix:0.2", "only blend"),
        ("blend:1.5", r"\[0, 1\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            make_method(bad)
    with pytest.raises(ValueError, match="naive takes no blend options"):
        make_method("naive", ratio=0.3)


def test_stale_bias_marks_exactly_the_tokens_not_recomputed(engine, source):
    cfg = BlendConfig(ratio=0.1, query_share=0.75, stale_bias=0.0)
    plan, _, (plain, biased) = _paired(engine, source, [cfg, replace(cfg, stale_bias=-0.5)], order=(2, 0, 1))
    assert plain.cache.bias is None
    docs = [(p, s) for p, s in zip(plan.segments, biased.report.segments, strict=True) if s.kind == "document"]
    stale = sum(s.tokens - s.recomputed for _, s in docs)
    slots = torch.cat([torch.arange(p.start, p.end) for p, _ in docs])
    bias = biased.cache.bias[:, :, : biased.cache.length]  # [L, KVH, n]
    assert bias[0].abs().sum() == 0  # before the check layer every token ran fresh
    for layer in (1, 2, 29):  # from the check layer on: the stale chunk tokens, every KV head, nothing else
        assert int((bias[layer, :, slots] == -0.5).all(dim=0).sum()) == stale
        assert int((bias[layer] != 0).any(dim=0).sum()) == stale
    assert _max_diff(plain.last_logits, biased.last_logits) > 1e-3
    n = biased.cache.length
    after = engine.teacher_forced_logits(biased, list(plan.token_ids[5:8]))  # decoding appends unbiased slots
    assert after.shape[0] == 3 and biased.cache.layer_bias(29)[:, n:].abs().sum() == 0
    assert int((biased.cache.layer_bias(29) != 0).any(dim=0).sum()) == stale
    full = FullPrefill().prefill(engine.runner, plan)
    whole = BlendReuse(BlendConfig(ratio=1.0, stale_bias=-0.5)).prefill(engine.runner, plan, source)
    assert _max_diff(whole.last_logits, full.last_logits) < 1e-3  # nothing stale: r = 1 is still full prefill
    with pytest.raises(ValueError, match="stale_bias must be a finite"):
        BlendConfig(stale_bias=float("nan"))


def test_a_cold_store_counts_every_chunk_computed(engine, source):
    """Chunks missing from the store are computed standalone in the request: all their tokens count as
    recomputed (not just the share blend recomputes again); once stored, they count as reused."""
    plan = _plan(engine, (2, 0, 1))
    cold = BlendReuse(BlendConfig(ratio=0.3)).prefill(engine.runner, plan, source)
    docs = [s for s in cold.report.segments if s.kind == "document"]
    assert cold.report.misses == 3 and all(s.tier is None for s in docs)
    assert all((s.reused, s.recomputed) == (0, s.tokens) for s in docs)
    warm = BlendReuse(BlendConfig(ratio=0.3)).prefill(engine.runner, plan, source)
    docs = [s for s in warm.report.segments if s.kind == "document"]
    assert warm.report.misses == 0 and all(s.tier == "ram" and s.reused == s.tokens for s in docs)
    assert sum(s.recomputed for s in docs) == round(0.3 * sum(s.tokens for s in docs))


def test_the_report_names_the_tokens_each_method_computed(engine, source):
    """``recomputed_offsets``: blend's are exactly the document tokens left without the stale bias (the ones it
    recomputed); naive's documents none, full's every token; the question's focus covers the whole prompt."""
    cfg = BlendConfig(ratio=0.2, stale_bias=-0.5)
    plan, _, (blend,) = _paired(engine, source, [cfg], order=(2, 0, 1))
    bias = blend.cache.layer_bias(29)  # [KVH, n]
    docs = [i for i, s in enumerate(plan.segments) if s.kind == "document"]
    for i in docs:
        seg, offsets = plan.segments[i], blend.report.recomputed_offsets(i)
        fresh = (bias[:, seg.start : seg.end] == 0).all(dim=0).nonzero().squeeze(1).tolist()
        assert offsets == fresh and 0 < len(offsets) == blend.report.segments[i].recomputed < len(seg.token_ids)
    focus = blend.report.focus
    assert focus.shape == (len(plan),) and float(focus[: plan.segments[docs[0]].start].abs().sum()) == 0
    assert float(focus[plan.segments[docs[0]].start : plan.segments[docs[-1]].end].sum()) > 0
    naive = NaiveReuse().prefill(engine.runner, plan, source).report
    full = FullPrefill().prefill(engine.runner, plan).report
    assert [naive.recomputed_offsets(i) for i in docs] == [[]] * len(docs) and naive.focus is None
    for i, seg in enumerate(plan.segments):
        assert full.recomputed_offsets(i) == list(range(len(seg.token_ids)))


def test_a_probe_through_fewer_layers_stops_there_and_keeps_the_budget(engine, source):
    """probe_layers=None runs the question through every layer; with 3 the rows leave the pass after layer 3's
    projections (no later layer sees a row) and the focus is summed over 3 layers; the budget is unchanged."""
    plan = _plan(engine, (0, 2, 1))
    NaiveReuse().prefill(engine.runner, _plan(engine), source)
    runner = engine.runner
    report = PrefillReport.for_plan("probe", plan)
    cache = runner.new_cache(len(plan))
    n = runner.drive(exact_head(runner, plan, cache, source, report, 512))
    layout = runner.drive(lay_out(runner, plan, cache, source, n, report))
    seen: list[int] = []
    real = runner.qkv
    runner.qkv = lambda layer, *a: seen.append(layer) or real(layer, *a)
    try:
        short, short_peak = runner.drive(question_focus(runner, cache, layout, layers=3))
    finally:
        del runner.qkv
    assert seen == [0, 1, 2, 3]
    every, every_peak = runner.drive(question_focus(runner, cache, layout))
    assert short.shape == every.shape and 0 < short.sum() < every.sum()
    # the peak is the largest single weight summed into the focus, and more layers can only raise it
    assert (short_peak <= short + 1e-6).all() and (short_peak <= every_peak).all() and every_peak.max() > 0
    assert not short[~layout.reused].any()  # computed tokens get no focus
    pre = BlendReuse(BlendConfig(ratio=0.2, probe_layers=3)).prefill(runner, plan, source)
    assert (
        pre.report.recomputed_tokens
        == BlendReuse(BlendConfig(ratio=0.2)).prefill(runner, plan, source).report.recomputed_tokens
    )
    with pytest.raises(ValueError, match="probe_layers must be >= 1"):
        BlendConfig(probe_layers=0)


def test_recent_focus_recomputes_the_tokens_nearest_the_question_without_a_probe(engine, source):
    """focus="recent": the focused share of the budget goes to the last reused tokens before the question, and no
    probe pass runs (one pass fewer through the layers); the budget is the same as the probe's."""
    assert recency_focus(torch.tensor([False, True, True, False, True])).tolist() == [0.0, 2.0, 3.0, 0.0, 5.0]
    plan = _plan(engine, (0, 2, 1))
    NaiveReuse().prefill(engine.runner, _plan(engine), source)
    runner = engine.runner
    passes: list[int] = []
    real = runner.run
    runner.run = lambda batch: passes.append(len(batch)) or real(batch)
    try:
        recent = BlendReuse(BlendConfig(ratio=0.2, query_share=1.0, focus="recent")).prefill(runner, plan, source)
        n_recent = len(passes)
        probe = BlendReuse(BlendConfig(ratio=0.2, query_share=1.0)).prefill(runner, plan, source)
    finally:
        del runner.run
    assert len(passes) - n_recent == n_recent + 1  # the probe's pass is the only extra one
    docs = [i for i, s in enumerate(plan.segments) if s.kind == "document"]
    reused = sum(len(plan.segments[i].token_ids) for i in docs)
    budget = round(0.2 * reused)
    assert recent.report.recomputed_tokens == probe.report.recomputed_tokens
    last = plan.segments[docs[-1]]
    assert recent.report.recomputed_offsets(docs[-1]) == list(range(len(last.token_ids)))[-budget:]  # its tail
    assert all(recent.report.segments[i].recomputed == 0 for i in docs[:-1])
    with pytest.raises(ValueError, match="focus must be one of probe, recent"):
        BlendConfig(focus="nearest")


def test_a_work_budget_spends_the_ratio_of_the_reused_tokens_work_and_takes_fewer_late_tokens(
    engine, source, monkeypatch
):
    """budget="work": the chosen tokens' cost (linear layers plus attention over the keys before them) fits the
    ratio of every reused token's cost; with the budget on the last passage's tail, fewer of its (costly)
    tokens are recomputed than by count (what the focus leaves over goes by deviation). Attention is made costly (a key
    costs 1/8 of a row) so that positions in a short prompt matter."""
    plan = _plan(engine, (0, 2, 1))
    NaiveReuse().prefill(engine.runner, _plan(engine), source)
    runner = engine.runner
    monkeypatch.setattr(runner, "keys_per_row", 8.0)
    cfg = BlendConfig(ratio=0.3, query_share=1.0, focus="recent")
    by_count = BlendReuse(cfg).prefill(runner, plan, source)
    by_work = BlendReuse(replace(cfg, budget="work")).prefill(runner, plan, source)
    docs = [i for i, s in enumerate(plan.segments) if s.kind == "document"]
    cost = torch.cat([1.0 + (torch.arange(plan.segments[i].start, plan.segments[i].end) + 1.0) / 8 for i in docs])
    chosen = torch.cat(
        [plan.segments[i].start + torch.tensor(by_work.report.recomputed_offsets(i), dtype=torch.long) for i in docs]
    )
    spent = float((1.0 + (chosen + 1.0) / 8).sum())
    assert spent <= 0.3 * float(cost.sum()) < spent + float(cost.max())  # the budget, filled to within a token
    last = plan.segments[docs[-1]]
    by_count_tail = by_count.report.recomputed_offsets(docs[-1])
    assert by_count_tail == list(range(len(last.token_ids)))[-len(by_count_tail) :]
    tail = [o for o in by_work.report.recomputed_offsets(docs[-1]) if o >= len(last.token_ids) - len(by_count_tail)]
    assert tail == by_count_tail[-len(tail) :] and 0 < len(tail) < len(by_count_tail)  # the same tail, shorter
    everything = BlendReuse(BlendConfig(ratio=1.0, budget="work")).prefill(runner, plan, source)
    assert (
        everything.report.recomputed_tokens
        == BlendReuse(BlendConfig(ratio=1.0)).prefill(runner, plan, source).report.recomputed_tokens
    )
    with pytest.raises(ValueError, match="budget must be one of tokens, work"):
        BlendConfig(budget="flops")


def test_tokens_a_subclass_forces_are_recomputed_inside_the_budget(engine, source):
    """``BlendReuse.forced`` (the oracle study's hook): forced tokens are recomputed whatever their scores, and
    the budget stays the ratio's count."""
    plan = _plan(engine, (0, 2, 1))
    NaiveReuse().prefill(engine.runner, _plan(engine), source)
    first = next(i for i, s in enumerate(plan.segments) if s.kind == "document")
    seg = plan.segments[first]
    must = torch.arange(seg.start + 2, seg.start + 5)  # three early tokens of the first passage

    class Forcing(BlendReuse):
        def forced(self, layout, idx, rel):
            forced, fired = super().forced(layout, idx, rel)
            forced[must - layout.start] = True
            return forced, fired

    cfg = BlendConfig(ratio=0.2, query_share=1.0, focus="recent")
    plain = BlendReuse(cfg).prefill(engine.runner, plan, source)
    forcing = Forcing(cfg).prefill(engine.runner, plan, source)
    assert 2 not in plain.report.recomputed_offsets(first)  # recency alone never picks the first passage
    assert {2, 3, 4} <= set(forcing.report.recomputed_offsets(first))
    assert forcing.report.recomputed_tokens == plain.report.recomputed_tokens


def test_spans_recompute_the_window_around_the_questions_strongest_read(engine, source):
    """``spans``: the window of reused tokens around the probe's peak attention is recomputed whatever the other
    scores say, inside the ratio's count; on this prompt it lies in the passage the question asks about."""
    plan = _plan(engine, (0, 2, 1))
    NaiveReuse().prefill(engine.runner, _plan(engine), source)
    secret = [i for i, s in enumerate(plan.segments) if s.kind == "document"][1]
    seen = {}

    class Spy(BlendReuse):
        def forced(self, layout, idx, rel):
            forced, fired = super().forced(layout, idx, rel)
            seen["forced"], seen["start"], seen["cost"] = forced.clone(), layout.start, layout.cost
            seen["limit"] = layout.ratio * (
                layout.reused.sum() if layout.cost is None else layout.cost[layout.reused].sum()
            )
            return forced, fired

    cfg = BlendConfig(ratio=0.3, query_share=0.0, spans=1, span_width=2)  # the spans alone, the rest by deviation
    pre = Spy(cfg).prefill(engine.runner, plan, source)
    window = seen["forced"].nonzero().squeeze(1) + seen["start"]  # prompt positions
    seg = plan.segments[secret]
    assert len(window) == 5 and seg.start <= int(window[0]) and int(window[-1]) < seg.end
    assert set((window - seg.start).tolist()) <= set(pre.report.recomputed_offsets(secret))
    plain = BlendReuse(replace(cfg, spans=0)).prefill(engine.runner, plan, source)
    assert pre.report.recomputed_tokens == plain.report.recomputed_tokens  # the same budget
    Spy(replace(cfg, budget="work")).prefill(engine.runner, plan, source)  # the window counted in work
    assert torch.equal(seen["forced"].nonzero().squeeze(1) + seen["start"], window)
    assert float(seen["cost"][seen["forced"]].sum()) <= float(seen["limit"])
    assert BlendConfig().spans == SPANS and BlendConfig(focus="recent").spans == 0  # the default needs the probe
    assert BlendConfig(query_share=0.0).spans == 0 and CacheBlendReuse().cfg.spans == 0  # plain CacheBlend stays so
    with pytest.raises(ValueError, match="focus='probe'"):
        BlendConfig(spans=2, focus="recent")
    with pytest.raises(ValueError, match="spans and span_width"):
        BlendConfig(spans=-1)


def test_blend_auto_picks_the_ratio_from_the_deviation_within_its_bounds(engine, source):
    plan = _plan(engine, (2, 0, 1))
    NaiveReuse().prefill(engine.runner, _plan(engine), source)
    reused = sum(len(s.token_ids) for s in plan.segments if s.kind == "document")

    def ratio(**kw):
        pre = BlendReuse(BlendConfig(**kw)).prefill(engine.runner, plan, source)
        docs = [s for s in pre.report.segments if s.kind == "document"]
        assert sum(s.recomputed for s in docs) == round(pre.report.blend_ratio * reused)
        return pre.report.blend_ratio

    assert ratio(ratio=0.4, auto=1e-9) == 0.4  # every token deviates: the cap
    assert ratio(ratio=0.4, auto=1e9, auto_min=0.05) == 0.05  # none does: the floor
    mid = ratio(ratio=1.0, auto=0.05, auto_min=0.0)
    assert 0.0 < mid < 1.0 and ratio(ratio=1.0, auto=0.2, auto_min=0.0) < mid  # a higher bar picks fewer
    assert ratio(ratio=0.25) == 0.25  # a fixed ratio is reported as is
    auto = make_method("blend:auto")
    assert (auto.cfg.auto, auto.cfg.ratio) == (AUTO_DEVIATION, AUTO_MAX)
    assert make_method("blend:auto", ratio=0.2).cfg.ratio == 0.2
    with pytest.raises(ValueError, match="auto_min <= ratio"):
        BlendConfig(ratio=0.1, auto=0.1, auto_min=0.2)


def _driven(engine, method, plan, source):
    """``method``'s prefill run pass by pass, alone: (passes, Prefilled)."""
    steps, n = method.prefill_steps(engine.runner, plan, source), 0
    try:
        batch = next(steps)
        while True:
            n += 1
            batch = steps.send(engine.runner.run(batch))
    except StopIteration as done:
        return n, done.value


def test_blends_first_layers_run_in_chunks_of_tokens_and_equal_one_pass(engine, source):
    """The layers before the check layer, where every token runs, go in passes of ``prefill_chunk`` tokens (so
    a scheduler's budget can cut them below a layer); the prompt's cache, logits and choice equal one pass."""
    plan = _plan(engine, (0, 2, 1))
    NaiveReuse().prefill(engine.runner, _plan(engine), source)
    n_whole, whole = _driven(engine, BlendReuse(), plan, source)
    n_split, split = _driven(engine, BlendReuse(prefill_chunk=16), plan, source)
    assert n_split >= n_whole + 3  # the ~70 tokens after the exact head: one pass of the first layer per 16
    assert _max_diff(whole.last_logits, split.last_logits) < 1e-4
    assert _max_diff(whole.cache.keys, split.cache.keys) < 1e-4
    assert _max_diff(whole.cache.values, split.cache.values) < 1e-4
    assert (split.report.recomputed_tokens, split.report.reused_tokens) == (
        whole.report.recomputed_tokens,
        whole.report.reused_tokens,
    )
