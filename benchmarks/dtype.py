"""Compute dtype for serving: bf16 and weight-only int8 against fp32, in speed and in answers.

    .venv/bin/python benchmarks/dtype.py --n 25 --out out/dtype
    .venv/bin/python benchmarks/dtype.py --dtypes fp32,bf16 --speed-only   # speed on this CPU, ~6 min

Speed (2 threads): prefill tokens/s on a 2K-token prompt; decode tokens/s with one sequence and with 8
decoding together (``Engine.generate_many``, 64-token answers to chat prompts). Quality, on prompts of
needle-code (seed 2) and squad (6 passages): each dtype's greedy answer next to fp32's (needle / gold found,
answer equal to fp32's) and KL(fp32 || dtype) of the next-token distributions teacher-forced along fp32's
answer. ``int8`` is bf16 compute with every linear layer's weights int8 per output channel
(``torch._weight_int8pack_mm``), built here for the measurement only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from kvstash.batch.scheduler import BatchConfig
from kvstash.bench.datasets import load_dataset
from kvstash.bench.metrics import answers_agree, contains_gold, kl_divergence
from kvstash.engine import Engine, EngineConfig
from kvstash.model.dtype import native_bf16
from kvstash.prompt import Segment
from kvstash.sampling import SamplingParams

CHAT = [
    "Write a long story about a river.",
    "Describe the history of Rome in detail.",
    "Explain how a car engine works.",
    "Write a poem about the sea.",
    "Tell me about the moon and its phases.",
    "How do plants grow from seeds?",
    "Describe a day in the life of a cat.",
    "What makes a good friend?",
]


class Int8Linear(torch.nn.Module):
    """A linear layer with int8 weights (symmetric, one bf16 scale per output channel), bf16 activations."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-8) / 127
        self.weight = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.scale = scale.to(torch.bfloat16)
        self.bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.weight, self.scale)
        out = out.reshape(*shape[:-1], -1)
        return out if self.bias is None else out + self.bias


def to_int8(engine: Engine) -> Engine:
    """Swap every linear layer of a bf16 engine's model (projections, MLP, LM head) for :class:`Int8Linear`."""
    model = engine.lm.model
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, Int8Linear(child))
    model.lm_head = Int8Linear(model.lm_head)
    return engine


def engines(names: list[str]) -> dict[str, Engine]:
    makers = {
        "fp32": lambda: Engine(EngineConfig(dtype="float32")),
        "bf16": lambda: Engine(EngineConfig(dtype="bfloat16")),
        "int8": lambda: to_int8(Engine(EngineConfig(dtype="bfloat16"))),
    }
    return {name: makers[name]() for name in ["fp32", *[n for n in names if n != "fp32"]]}


def cpu() -> dict:
    """What decides bf16's speed here: the CPU's model name and whether it has bf16 in hardware."""
    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), "?")
    return {"cpu": model, "native_bf16": native_bf16(), "torch_capability": torch.backends.cpu.get_cpu_capability()}


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def speed(engine: Engine, tokens: int = 2048) -> dict:
    ids = (engine.tokenizer(" ".join(CHAT) * 40)["input_ids"] * 2)[:tokens]
    engine.runner.prefill(engine.runner.new_cache(tokens + 8), ids[:256], 0, 512)  # warm-up
    times = []
    for _ in range(3):
        cache = engine.runner.new_cache(tokens + 8)
        t = time.perf_counter()
        engine.runner.prefill(cache, ids, 0, 512)
        times.append(time.perf_counter() - t)
    prompts = [[Segment(q, "user")] for q in CHAT]
    params = SamplingParams(max_tokens=64)
    engine.generate_many(prompts[:2], params, batch=BatchConfig(max_batch=2))  # warm-up
    out = {"prefill_tok_s": round(tokens / statistics.median(times), 1)}
    for batch in (1, 8):
        t = time.perf_counter()
        res = engine.generate_many(prompts, params, batch=BatchConfig(max_batch=batch))
        out[f"decode_tok_s_batch{batch}"] = round(sum(r.completion_tokens for r in res) / (time.perf_counter() - t), 1)
    return out


def quality(engs: dict[str, Engine], examples, max_tokens: int) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {name: [] for name in engs}
    params = SamplingParams(max_tokens=max_tokens)
    for ex in examples:
        segs = [Segment(d) for d in ex.documents] + [Segment(ex.question, "user")]
        ref = engs["fp32"].generate(segs, params)
        ref_logits = engs["fp32"].teacher_forced_logits(engs["fp32"].prefill(engs["fp32"].plan(segs)), ref.token_ids)
        for name, eng in engs.items():
            res = ref if name == "fp32" else eng.generate(segs, params)
            tf = eng.teacher_forced_logits(eng.prefill(eng.plan(segs)), ref.token_ids)
            kl = float(kl_divergence(ref_logits, tf.float()).mean())
            rows[name].append(
                {
                    "id": ex.id,
                    "found": contains_gold(res.text, ex.answers),
                    "agree": answers_agree(res.text, ref.text),
                    "same_ids": res.token_ids == ref.token_ids,
                    "kl": kl,
                    "tokens": res.prompt_tokens,
                }  # fmt: skip
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=25, help="prompts per dataset (needle-code seed 2, squad)")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--out", type=Path, default=Path("out/dtype"))
    ap.add_argument("--dtypes", default="fp32,bf16,int8", help="which of fp32, bf16, int8 (fp32 always runs)")
    ap.add_argument("--speed-only", action="store_true", help="speed only, no answers compared")
    args = ap.parse_args()
    torch.set_num_threads(2)
    engs = engines(args.dtypes.split(","))
    speeds = {name: speed(eng) for name, eng in engs.items()}
    machine = cpu()
    print(json.dumps({"machine": machine, "speed": speeds}))
    if args.speed_only:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "dtype-speed.json").write_text(json.dumps({"machine": machine, "speed": speeds}, indent=1))
        return
    examples = load_dataset("needle-code", n=args.n, passages=6, seed=2) + load_dataset(
        "squad", n=args.n, passages=6, seed=2
    )
    rows = quality(engs, examples, args.max_tokens)
    table = []
    for name, rs in rows.items():
        table.append(
            {
                "dtype": name,
                **speeds[name],
                "prompts": len(rs),
                "found": sum(r["found"] for r in rs),
                "agree": sum(r["agree"] for r in rs),
                "same_ids": sum(r["same_ids"] for r in rs),
                "kl_mean": statistics.mean(r["kl"] for r in rs),
                "kl_median": statistics.median(r["kl"] for r in rs),
            }  # fmt: skip
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dtype.json").write_text(json.dumps({"machine": machine, "summary": table, "rows": rows}, indent=1))
    print("| dtype | prefill tok/s | decode tok/s (1) | decode tok/s (8 together) | found | answer = fp32's | "
          "same tokens | KL mean | KL median |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(
            f"| {r['dtype']} | {r['prefill_tok_s']} | {r['decode_tok_s_batch1']} | {r['decode_tok_s_batch8']} | "
            f"{r['found']}/{r['prompts']} | {r['agree']}/{r['prompts']} | {r['same_ids']}/{r['prompts']} | "
            f"{r['kl_mean']:.4f} | {r['kl_median']:.4f} |"
        )


if __name__ == "__main__":
    main()
