"""Decode attention per layer: the PyTorch path (torch_ops) against the native CPU kernel (cpu_native).

usage: python benchmarks/decode_attention.py
SmolLM2's shapes (9 heads, 3 KV heads, head_dim 64, block 16), bfloat16 K/V in shuffled blocks.
"""
import time

import torch

from kernels import build_metadata, cpu_native, torch_ops

torch.manual_seed(0)
heads, kv_heads, dim, block = 9, 3, 64, 16
for batch, context in ((1, 400), (8, 400), (64, 400), (64, 1000)):
    per_seq = -(-context // block)
    num_blocks = batch * per_seq + 10
    k = torch.randn(num_blocks, block, kv_heads, dim).bfloat16()
    v = torch.randn(num_blocks, block, kv_heads, dim).bfloat16()
    order = torch.randperm(num_blocks).tolist()
    tables = [order[i * per_seq : (i + 1) * per_seq] for i in range(batch)]
    meta = build_metadata(tables, [context] * batch, [1] * batch, block)
    q = torch.randn(batch, heads, dim).bfloat16()
    times = []
    for fn in (torch_ops.paged_attention, cpu_native.paged_attention):
        with torch.inference_mode():
            for _ in range(3):
                fn(q, k, v, meta, dim**-0.5)
            start = time.perf_counter()
            for _ in range(30):
                fn(q, k, v, meta, dim**-0.5)
            times.append((time.perf_counter() - start) / 30 * 1e3)
    kv_bytes = 2 * batch * context * kv_heads * dim * 2
    print(f"batch {batch:2d} context {context:4d}: PyTorch path {times[0]:.3f} ms/layer, native {times[1]:.3f} ms/layer "
          f"({times[0] / times[1]:.1f}x; native reads K/V at {kv_bytes / times[1] / 1e6:.1f} GB/s)")
