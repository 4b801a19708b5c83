"""The decoder layers' linear layers and the LM head through each kernel this CPU has, for a few row counts.

    .venv/bin/python benchmarks/linear_kernels.py --rows 1,4,8,16,512

SmolLM2-135M's shapes in fp32 (30 layers of fused q/k/v, o, fused gate/up and down, each layer its own random
weights so they stream from memory as in a real pass; then the 49152 x 576 head): MKL (``F.linear``, the
modules' path), oneDNN reading the weight in place, and oneDNN from its packed copy
(:func:`kvstash.model.linear.pack`, laid out for :data:`~kvstash.model.linear.PACK_ROWS` rows). Medians of
``--repeat`` runs, milliseconds. What :mod:`kvstash.model.choice` decides between, without the model.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from decode_step import _ms  # benchmarks/ is on the path when a script there runs

LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # [out, in]: qkv, o, gate_up, down
HEAD_SHAPE = (49152, 576)


def _kernels(weight: torch.Tensor, packed: torch.Tensor) -> dict:
    def onednn(w):
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")

    return {"mkl": lambda x: F.linear(x, weight), "onednn_in_place": onednn(weight), "onednn_packed": onednn(packed)}


def measure(rows: int, layer_kernels: list[list[dict]], head_kernels: dict, repeat: int) -> dict:
    xs = {i: torch.randn(rows, i) for _, i in LAYER_SHAPES}
    row = {"rows": rows}
    for name in ("mkl", "onednn_in_place", "onednn_packed"):

        def layers_pass(name=name):
            for ks in layer_kernels:
                for k, (_, i) in zip(ks, LAYER_SHAPES, strict=True):
                    k[name](xs[i])

        row[f"layers_{name}_ms"] = _ms(layers_pass, repeat)
        row[f"head_{name}_ms"] = _ms(lambda name=name: head_kernels[name](xs[576]), repeat)
    return row


def main() -> None:
    from kvstash.model.linear import pack

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,4,8,16,512", help="row counts, comma-separated")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=7, help="timed runs per median")
    args = ap.parse_args()
    torch.manual_seed(0)
    with torch.inference_mode():
        layers = [[torch.randn(*s) * 0.02 for s in LAYER_SHAPES] for _ in range(args.layers)]
        layer_kernels = [[_kernels(w, pack(w)) for w in ws] for ws in layers]
        head = torch.randn(*HEAD_SHAPE) * 0.02
        head_kernels = _kernels(head, pack(head))
        for rows in (int(r) for r in args.rows.split(",")):
            print(json.dumps(measure(rows, layer_kernels, head_kernels, args.repeat)), flush=True)
    print(f"fp32, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")


if __name__ == "__main__":
    main()
