"""Every linear of a decode step at the default model's shapes: our GGUF-block kernels against torch's.

usage: python benchmarks/quant_matmul_bench.py [--tokens 1,2,4,8,16,64] [--repeats 7] [--threads 2] [--only ours,...]

SmolLM2-135M-Instruct: 30 layers of fused q/k/v 576->960 (three Q4_1 tensors in the GGUF: 576+192+192 rows),
o 576->576, fused gate/up 576->3072 (two Q4_1 tensors), down 1536->576, and the tied Q8_0 LM head 576->49152.
Every layer gets its own random weights (valid fp16 scales), so, as in a real step, nothing stays in cache
(~96 MB of blocks against 32 MB of L3). One "step" runs all 121 products for T rows of activations.

Methods:
  ours      kernels/quant.py: float32 activations, weights as stored (matmul_multi for q/k/v and gate/up)
  int4pack  torch.ops.aten._weight_int4pack_mm_for_cpu, group size 32, bfloat16 activations, the layers' Q4_1
            as int4 with scales and zeros (exact up to their bfloat16 rounding); the LM head through
            _weight_int8pack_mm (per-channel scales: Q8_0's per-block scales don't fit; timing only)
  int8pack  torch.ops.aten._weight_int8pack_mm for every weight, bfloat16 activations (per-channel scales)
  bf16pack  the engine's bfloat16 path today: oneDNN prepacked linears (localchat.model.llama.PackedLinear)
  fp32      F.linear on float32 weights (the dequantized model)
Effective GB/s = the method's own weight bytes per step / median step time. These 2-core VMs are shared: the
load average is printed with every line, and each cell also gives the fastest step (the least disturbed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from kernels import quant
from localchat.model.llama import PackedLinear

LAYERS, HIDDEN, INTER, VOCAB = 30, 576, 1536, 49152
QKV_ROWS = (576, 192, 192)


def random_blocks(rng: np.random.Generator, qtype: Q, rows: int, cols: int) -> quant.QuantizedWeight:
    """Random codes with finite fp16 scales (d in [1e-3, 1e-2], Q4_1 mins in [-0.08, 0])."""
    qk, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // qk, size), dtype=np.uint8)
    raw[..., 0:2] = rng.uniform(1e-3, 1e-2, size=(rows, cols // qk, 1)).astype(np.float16).view(np.uint8)
    if qtype == Q.Q4_1:
        raw[..., 2:4] = rng.uniform(-0.08, 0, size=(rows, cols // qk, 1)).astype(np.float16).view(np.uint8)
    return quant.QuantizedWeight(torch.from_numpy(raw.reshape(rows, -1)), int(qtype), rows, cols)


def build_model(seed: int = 0) -> tuple[list[dict], quant.QuantizedWeight]:
    rng = np.random.default_rng(seed)
    layers = []
    for _ in range(LAYERS):
        layers.append({
            "qkv": [random_blocks(rng, Q.Q4_1, rows, HIDDEN) for rows in QKV_ROWS],
            "o": random_blocks(rng, Q.Q4_1, HIDDEN, HIDDEN),
            "gate_up": [random_blocks(rng, Q.Q4_1, INTER, HIDDEN) for _ in range(2)],
            "down": random_blocks(rng, Q.Q4_1, HIDDEN, INTER),
        })
    return layers, random_blocks(rng, Q.Q8_0, VOCAB, HIDDEN)


def fused(parts: list[quant.QuantizedWeight]) -> quant.QuantizedWeight:
    return quant.QuantizedWeight(torch.cat([w.data for w in parts]), parts[0].qtype, sum(w.rows for w in parts), parts[0].cols)


def dense_layers(layers):
    """Each layer's four products as single (fused) QuantizedWeights, for the methods without a multi call."""
    return [[fused(L["qkv"]), L["o"], fused(L["gate_up"]), L["down"]] for L in layers]


# ---- the methods: each returns (step(T) -> None, weight bytes per step) -----------------------------------

def method_ours(layers, head, tokens):
    x = torch.randn(tokens, HIDDEN)
    xi = torch.randn(tokens, INTER)
    outs = [torch.empty(tokens, n) for n in (960, HIDDEN, 2 * INTER, HIDDEN, VOCAB)]

    def step():
        for L in layers:
            quant.matmul_multi(x, L["qkv"], outs[0])
            quant.matmul(x, L["o"], outs[1])
            quant.matmul_multi(x, L["gate_up"], outs[2])
            quant.matmul(xi, L["down"], outs[3])
        quant.matmul(x, head, outs[4])

    nbytes = sum(w.nbytes for L in layers for k in ("qkv", "gate_up") for w in L[k])
    nbytes += sum(L[k].nbytes for L in layers for k in ("o", "down")) + head.nbytes
    return step, nbytes


def q4_1_int4pack(w: quant.QuantizedWeight):
    """Q4_1 blocks as torch's int4 layout: w = (q - 8) * scale + zero with scale = d, zero = m + 8d."""
    blocks = w.data.numpy().reshape(w.rows, w.cols // 32, 20)
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)[..., 0]
    m = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)[..., 0]
    qs = blocks[..., 4:]
    q = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(w.rows, w.cols).astype(np.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(q), 2)
    scale_zero = torch.stack([torch.from_numpy(d.T), torch.from_numpy((m + 8 * d).T)], -1).to(torch.bfloat16).contiguous()
    return packed, scale_zero


def int8pack(w: quant.QuantizedWeight):
    """A weight's dequantized values as int8 with per-channel scales (timing stand-in, not exact)."""
    dense = w.dequantize(torch.float32)
    scale = dense.abs().amax(1).clamp_min(1e-8) / 127
    q = torch.round(dense / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale.to(torch.bfloat16)


def method_int4pack(layers, head, tokens):
    packed = [[q4_1_int4pack(w) for w in ws] for ws in dense_layers(layers)]
    head_q, head_s = int8pack(head)
    x, xi = torch.randn(tokens, HIDDEN).bfloat16(), torch.randn(tokens, INTER).bfloat16()
    mm = torch.ops.aten._weight_int4pack_mm_for_cpu

    def step():
        for (qkv, o, gu, down) in packed:
            mm(x, qkv[0], 32, qkv[1])
            mm(x, o[0], 32, o[1])
            mm(x, gu[0], 32, gu[1])
            mm(xi, down[0], 32, down[1])
        torch.ops.aten._weight_int8pack_mm(x, head_q, head_s)

    nbytes = sum(p.numel() * p.element_size() + sz.numel() * 2 for ws in packed for p, sz in ws)
    return step, nbytes + head_q.numel() + head_s.numel() * 2


def method_int8pack(layers, head, tokens):
    packed = [[int8pack(w) for w in ws] for ws in dense_layers(layers)]
    head_q, head_s = int8pack(head)
    x, xi = torch.randn(tokens, HIDDEN).bfloat16(), torch.randn(tokens, INTER).bfloat16()
    mm = torch.ops.aten._weight_int8pack_mm

    def step():
        for (qkv, o, gu, down) in packed:
            mm(x, *qkv)
            mm(x, *o)
            mm(x, *gu)
            mm(xi, *down)
        mm(x, head_q, head_s)

    nbytes = sum(q.numel() + s.numel() * 2 for ws in packed for q, s in ws)
    return step, nbytes + head_q.numel() + head_s.numel() * 2


def method_dense(layers, head, tokens, dtype):
    weights = [[w.dequantize(dtype) for w in ws] for ws in dense_layers(layers)]
    head_w = head.dequantize(dtype)
    x, xi = torch.randn(tokens, HIDDEN, dtype=dtype), torch.randn(tokens, INTER, dtype=dtype)
    if dtype == torch.bfloat16:
        fns = [[PackedLinear(w, None) for w in ws] for ws in weights]
        head_fn = PackedLinear(head_w, None)
    else:
        fns = [[(lambda a, w=w: F.linear(a, w)) for w in ws] for ws in weights]
        head_fn = lambda a: F.linear(a, head_w)  # noqa: E731

    def step():
        for qkv, o, gu, down in fns:
            qkv(x)
            o(x)
            gu(x)
            down(xi)
        head_fn(x)

    nbytes = sum(w.numel() * w.element_size() for ws in weights for w in ws) + head_w.numel() * head_w.element_size()
    return step, nbytes


METHODS = {
    "ours": method_ours,
    "int4pack": method_int4pack,
    "int8pack": method_int8pack,
    "bf16pack": lambda layers, head, t: method_dense(layers, head, t, torch.bfloat16),
    "fp32": lambda layers, head, t: method_dense(layers, head, t, torch.float32),
}


def time_steps(step, repeats: int) -> tuple[float, float]:
    """(median, fastest) ms of `repeats` steps after one warm-up (first touch of outputs, oneDNN packing)."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, min(times) * 1e3


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="1,2,4,8,16,64", help="batch sizes T (rows of activations)")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per cell (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default=",".join(METHODS), help=f"comma-separated subset of {list(METHODS)}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    token_counts = [int(t) for t in args.tokens.split(",")]
    names = [n for n in args.only.split(",") if n]
    if "ours" in names and not quant.available():
        sys.exit("the native quantized kernels are unavailable here (no compiler, or LOCALCHAT_NATIVE_KERNELS=0)")
    print(f"threads {args.threads}, kernels {quant.isa()}, load average at start {loadavg()}, cpus {os.cpu_count()}")
    layers, head = build_model()
    results: dict[tuple[str, int], tuple[float, float, int]] = {}
    with torch.inference_mode():
        for name in names:
            for tokens in token_counts:
                step, nbytes = METHODS[name](layers, head, tokens)
                reps = args.repeats if tokens <= 16 else max(3, args.repeats // 2)
                ms, fastest = time_steps(step, reps)
                results[name, tokens] = (ms, fastest, nbytes)
                print(f"  {name:9s} T={tokens:3d}: {ms:8.2f} ms/step (fastest {fastest:7.2f})  {ms / tokens:7.3f} ms/token  "
                      f"{nbytes / 1e6:6.1f} MB  {nbytes / ms / 1e6:5.1f} GB/s   (load {loadavg()})", flush=True)
                del step
    print(f"\nload average at end {loadavg()}\n")
    print("median ms per step / fastest (median ms per token) [effective weight GB/s]")
    print("| T | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for tokens in token_counts:
        cells = []
        for name in names:
            ms, fastest, nbytes = results[name, tokens]
            cells.append(f"{ms:.2f} / {fastest:.2f} ({ms / tokens:.2f}) [{nbytes / ms / 1e6:.0f}]")
        print(f"| {tokens} | " + " | ".join(cells) + " |")
    print("\nweight MB per step: " + ", ".join(f"{n} {results[n, token_counts[0]][2] / 1e6:.0f}" for n in names))


if __name__ == "__main__":
    main()
