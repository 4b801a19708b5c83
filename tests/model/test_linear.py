"""Linear layers through oneDNN: the LM head and the fused decoder projections compute what the modules do from
oneDNN's packed copy of the weights or reading them in place (``KVSTASH_PACK_WEIGHTS``), hold the plain weights
once, and are chosen once."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from kvstash.model.head import lm_head
from kvstash.model.linear import onednn_linear, pack, packing
from kvstash.model.projections import FusedProjections, Projections, fusable, projections

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@pytest.fixture(autouse=True)
def kernels_file(tmp_path, monkeypatch):
    """The tiny layers' timing answers go to a throwaway file (the engine's model is already loaded)."""
    monkeypatch.setattr("kvstash.model.choice.kvstash_home", lambda: tmp_path)


def tiny_layer(seed: int = 0, dtype=torch.float32) -> LlamaDecoderLayer:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
    return LlamaDecoderLayer(cfg, layer_idx=0).to(dtype)


@needs_onednn
@pytest.mark.parametrize("packed", ["1", "0"])
@pytest.mark.parametrize("rows", [1, 3, 8, 40])
def test_the_onednn_linear_equals_the_module(rows, packed, monkeypatch):
    monkeypatch.setenv("KVSTASH_PACK_WEIGHTS", packed)
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 1000, bias=False)
    x = torch.randn(rows, 64)
    with torch.inference_mode():
        want, got = linear(x), onednn_linear(linear.weight)(x)
    assert got.shape == want.shape == (rows, 1000)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


@needs_onednn
def test_a_packed_weight_is_onednns_own_copy_and_the_weight_is_left_as_it_was():
    weight = torch.nn.Linear(64, 100, bias=False).weight.detach()
    before = weight.clone()
    packed = pack(weight)
    if packed is weight:  # this CPU cannot pack fp32 (no such CPU known): nothing to check
        pytest.skip("oneDNN cannot pack an fp32 weight here")
    assert packed.is_mkldnn and packed.shape == weight.shape  # an opaque oneDNN tensor, not a view of the weight
    assert torch.equal(weight, before)


def test_a_weight_that_cannot_be_packed_is_read_in_place(monkeypatch):
    def refuse(weight, rows):
        raise RuntimeError("bf16 path needs the cpu support avx512bw")  # what torch says on an AVX2 CPU

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse)
    weight = torch.randn(8, 4)
    assert pack(weight) is weight


@pytest.mark.parametrize("value, want", [("1", True), ("0", False), ("off", False), ("", True)])
def test_kvstash_pack_weights_turns_packing_on_and_off(monkeypatch, value, want):
    monkeypatch.setenv("KVSTASH_PACK_WEIGHTS", value)
    assert packing() is want


def test_a_bad_kvstash_pack_weights_says_what_it_takes(monkeypatch):
    monkeypatch.setenv("KVSTASH_PACK_WEIGHTS", "yes please")
    with pytest.raises(ValueError, match="use 1 .* or 0"):
        packing()


def test_the_head_choice_is_made_once_and_gives_the_modules_numbers():
    torch.manual_seed(1)
    linear = torch.nn.Linear(64, 1000, bias=False)
    head = lm_head(linear)
    assert lm_head(linear) is head  # remembered on the module, not timed again
    x = torch.randn(4, 64)
    with torch.inference_mode():
        assert torch.allclose(head(x), linear(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "make", [lambda: torch.nn.Linear(64, 100, bias=True), lambda: torch.nn.Linear(64, 100, bias=False).half()]
)
def test_a_head_with_a_bias_or_in_fp16_stays_the_module(make):
    linear = make()
    assert lm_head(linear) is linear


@needs_onednn
@pytest.mark.parametrize("rows", [1, 5])
def test_fused_projections_compute_what_the_modules_do_on_the_same_memory(rows):
    layer = tiny_layer()
    x, attn_out = torch.randn(rows, 64), torch.randn(rows, 64)
    with torch.inference_mode():
        plain = Projections(layer)
        want = (*plain.qkv(x), plain.out(attn_out), plain.mlp(x))
        fused = FusedProjections(layer)
        got_q, got_k, got_v = fused.qkv(x)
        for got, w in zip((got_q, got_k, got_v, fused.out(attn_out), fused.mlp(x)), want, strict=True):
            assert got.shape == w.shape
            assert torch.allclose(got, w, atol=1e-5, rtol=1e-5)
    assert got_q.shape == (rows, 64) and got_k.shape == got_v.shape == (rows, 32)


@needs_onednn
def test_chosen_fused_projections_leave_one_copy_of_the_weights_and_are_kept():
    """Whichever way the timing goes, the choice is remembered; when fused wins, the modules' weights are views
    of the fused ones (the plain weights held once; oneDNN's packed copy is the only other) and still compute
    the same."""
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList([tiny_layer(1), tiny_layer(2)])
    model.config = LlamaConfig(hidden_size=64)
    x = torch.randn(3, 64)
    with torch.inference_mode():
        want = [layer.mlp(x) for layer in model.model.layers]
        chosen = projections(model)
        assert projections(model) is chosen
        for layer, proj, w in zip(model.model.layers, chosen, want, strict=True):
            assert torch.allclose(proj.mlp(x), w, atol=1e-5, rtol=1e-5)
            assert torch.allclose(layer.mlp(x), w, atol=1e-5, rtol=1e-5)
            if isinstance(proj, FusedProjections):
                a = layer.self_attn
                assert a.q_proj.weight.data_ptr() == proj.qkv_w.data_ptr()
                assert a.k_proj.weight.data_ptr() == proj.qkv_w[64:].data_ptr()
                assert layer.mlp.up_proj.weight.data_ptr() == proj.gate_up_w[96:].data_ptr()


def test_layers_that_are_not_plain_linears_are_not_fused():
    layer = tiny_layer()
    assert fusable(layer)
    layer.self_attn.q_proj = torch.nn.Linear(64, 64, bias=True)
    assert not fusable(layer)  # a bias
    half = tiny_layer(dtype=torch.float16)
    assert not fusable(half)  # oneDNN's CPU linear here: fp32 and bf16
    wrapped = tiny_layer()
    wrapped.mlp.down_proj = torch.nn.Sequential(wrapped.mlp.down_proj)  # e.g. a quantized replacement
    assert not fusable(wrapped)


def test_the_engines_logits_equal_the_modules(engine):
    """Whichever kernel the runner chose, its logits are the model's own LM head's (fp32 rounding)."""
    r = engine.runner
    h = torch.randn(5, engine.lm.model.config.hidden_size)
    with torch.inference_mode():
        want = engine.lm.model.lm_head(engine.lm.model.model.norm(h)).float()
    assert torch.allclose(r.logits(h), want, atol=1e-4, rtol=1e-5)


def test_the_engines_layers_equal_the_modules(engine):
    """Whichever projections the runner chose, each layer computes what the model's modules compute."""
    r = engine.runner
    x = torch.randn(4, engine.lm.model.config.hidden_size)
    with torch.inference_mode():
        for layer, proj in zip(r.layers, r.projections(), strict=True):
            a = layer.self_attn
            want = (a.q_proj(x), a.k_proj(x), a.v_proj(x), layer.mlp(x))
            for got, w in zip((*proj.qkv(x), proj.mlp(x)), want, strict=True):  # fp32 rounding of sums of 576
                torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5 * float(w.abs().max()))


def tiny_model():
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList([tiny_layer(1), tiny_layer(2)])
    model.config = LlamaConfig(hidden_size=64)
    return model


@needs_onednn
@pytest.mark.parametrize("forced, fused", [("torch", False), ("onednn", True)])
def test_kvstash_kernels_picks_the_projections_and_the_head(monkeypatch, forced, fused):
    monkeypatch.setenv("KVSTASH_KERNELS", forced)
    model = tiny_model()
    q_ptr = model.model.layers[0].self_attn.q_proj.weight.data_ptr()
    chosen = projections(model)
    assert all(isinstance(p, FusedProjections) == fused for p in chosen)
    assert (model.model.layers[0].self_attn.q_proj.weight.data_ptr() != q_ptr) == fused  # untouched if not fused
    linear = torch.nn.Linear(64, 100, bias=False)
    assert (lm_head(linear) is linear) != fused


@needs_onednn
def test_packed_and_in_place_kernels_are_timed_and_remembered_apart(tmp_path, monkeypatch):
    """A choice timed against the packed weights is not reused for weights read in place, nor the other way."""
    monkeypatch.delenv("KVSTASH_KERNELS", raising=False)
    for value in ("1", "0"):
        monkeypatch.setenv("KVSTASH_PACK_WEIGHTS", value)
        projections(tiny_model())
        lm_head(torch.nn.Linear(64, 100, bias=False))
    keys = sorted(k.split(" | ")[0] for k in json.loads((tmp_path / "kernels.json").read_text()))
    assert keys == [
        "head 100x64 float32",
        "head 100x64 float32 packed",
        "projections 2 layers 64x64,32x64,64x64,96x64 float32",
        "projections 2 layers 64x64,32x64,64x64,96x64 float32 packed",
    ]


@needs_onednn
@pytest.mark.parametrize("forced, packed", [("torch", "1"), ("onednn", "1"), ("onednn", "0")])
def test_the_runner_says_what_its_linear_layers_run_on(monkeypatch, forced, packed):
    from transformers import LlamaForCausalLM

    from kvstash.model.runner import Runner

    monkeypatch.setenv("KVSTASH_KERNELS", forced)
    monkeypatch.setenv("KVSTASH_PACK_WEIGHTS", packed)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                      num_key_value_heads=2, num_hidden_layers=2)  # fmt: skip
    runner = Runner(LlamaForCausalLM(cfg).eval())
    runner.choose_kernels()
    kernels = runner.kernels()
    if forced == "torch":
        assert kernels == {"projections": "torch", "head": "torch", "packed_mb": 0.0}
        return
    can_pack = packed == "1" and pack(torch.zeros(4, 4)).is_mkldnn
    suffix = " packed" if can_pack else ""
    assert kernels["projections"] == "onednn fused" + suffix and kernels["head"] == "onednn" + suffix
    # packed: every layer's 7 weights (2 x 30720 floats) and the head's (100 x 64), once more
    assert kernels["packed_mb"] == (round((2 * 30720 + 6400) * 4 / 2**20, 1) if can_pack else 0.0)


def test_a_head_left_to_the_module_builds_no_onednn_copy(monkeypatch):
    """Forced (or remembered) to the module, the head never packs a copy of its weight (113 MB for SmolLM2)."""
    monkeypatch.setenv("KVSTASH_KERNELS", "torch")

    def refuse(weight):
        raise AssertionError("the oneDNN head was built though the module runs the head")

    monkeypatch.setattr("kvstash.model.head.onednn_linear", refuse)
    linear = torch.nn.Linear(64, 100, bias=False)
    assert lm_head(linear) is linear
