"""Fused q/k/v and gate/up projections (bf16): the same bits as the separate matmuls, weights held once."""

from __future__ import annotations

import torch

from kvstash.engine import Engine
from kvstash.prompt import Segment
from kvstash.sampling import SamplingParams

PROMPT = [
    Segment("The Danube flows through Vienna, Bratislava, Budapest and Belgrade into the Black Sea. " * 4),
    Segment("Name the cities on the Danube.", "user"),
]


def test_bf16_fuses_with_the_same_logits_and_answers_and_fp32_does_not(engine):
    assert engine.runner.fused is None  # float32 (the reference): fused matmuls are slower there, so none
    with Engine(dtype="bfloat16") as bf16:
        runner = bf16.runner
        fused = runner.fused
        assert fused is not None and len(fused) == runner.num_layers
        attn = runner.layers[3].self_attn
        assert attn.k_proj.weight.data_ptr() == fused[3].qkv[fused[3].q_out :].data_ptr()  # a view, not a copy
        plan = bf16.plan(PROMPT)

        def answer():
            pre = bf16.prefill(plan, "full")
            return pre.last_logits, bf16.decode(pre, SamplingParams(max_tokens=12)).token_ids

        with_fused = answer()
        runner.fused = None
        try:
            separate = answer()
        finally:
            runner.fused = fused
        assert torch.equal(with_fused[0], separate[0]) and with_fused[1] == separate[1]
