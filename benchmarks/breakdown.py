"""Decode-step breakdown by component (micro-timed with the real weights), plus the floors.

usage: python benchmarks/breakdown.py [dtype] [batch] [context] [threads]
"""
import sys, time
import torch
import torch.nn.functional as F
import kernels
from localchat.model.loader import load_model
from localchat.model.llama import apply_rotary

dtype = getattr(torch, sys.argv[1] if len(sys.argv) > 1 else "bfloat16")
B = int(sys.argv[2]) if len(sys.argv) > 2 else 1
L = int(sys.argv[3]) if len(sys.argv) > 3 else 256
if len(sys.argv) > 4: torch.set_num_threads(int(sys.argv[4]))
lm = load_model(None, dtype=dtype)
m = lm.model
layer = m.layers[0]
bs = 16
nblk = B * (-(-L // bs)) + 1
kc = torch.zeros(nblk, bs, 3, 64, dtype=dtype); vc = torch.zeros_like(kc)
tables = [list(range(1 + i * (-(-L // bs)), 1 + (i + 1) * (-(-L // bs)))) for i in range(B)]
meta = kernels.build_metadata(tables, [L] * B, [1] * B, bs)
x = torch.randn(B, 576, dtype=dtype)
pos = torch.full((B,), L - 1)

def t(fn, n=50):
    with torch.inference_mode():
        for _ in range(3): fn()
        s = time.perf_counter()
        for _ in range(n): fn()
        return (time.perf_counter() - s) / n * 1e3

cos, sin = m.rotary(pos)
qkv = layer.qkv_proj(x)
q = qkv[:, :576].view(B, 9, 64)
hid = torch.randn(B, 1536, dtype=dtype)
parts = {
    "rmsnorm x2": lambda: (layer.input_layernorm(x), layer.post_attention_layernorm(x)),
    "qkv_proj": lambda: layer.qkv_proj(x),
    "rotary": lambda: apply_rotary(qkv[:, :768].view(B, 12, 64), cos, sin),
    "write_kv": lambda: kernels.write_kv(qkv[:, 576:768].view(B, 3, 64), qkv[:, 768:].view(B, 3, 64), kc, vc, meta.slot_mapping),
    "attention": lambda: (meta.scratch.clear(), kernels.paged_attention(q, kc, vc, meta, 0.125)),
    "o_proj": lambda: layer.o_proj(x),
    "gate_up": lambda: layer.gate_up_proj(x),
    "silu*up": lambda: F.silu(hid[:, :768]).mul_(hid[:, 768:]),
    "down": lambda: layer.down_proj(hid),
}
tot = 0
with torch.inference_mode():
    with torch.inference_mode():
        full_layer = t(lambda: layer(x.clone(), cos, sin, (kc, vc), meta))
res = {k: t(f) for k, f in parts.items()}
head = t(lambda: F.linear(m.norm(x), m.lm_head_weight).float(), 20)
print(f"{dtype} B={B} L={L} threads={torch.get_num_threads()}")
for k, v in res.items():
    print(f"  {k:12s} {v:7.3f} ms/layer  x30 = {v*30:7.1f} ms")
print(f"  sum parts    {sum(res.values()):7.3f} ms/layer, full layer {full_layer:.3f} ms/layer x30 = {full_layer*30:.1f} ms")
print(f"  lm_head      {head:7.1f} ms")
wbytes = sum(p.numel() * p.element_size() for p in m.parameters())
print(f"  weights {wbytes/1e6:.0f} MB; at 13 GB/s read: {wbytes/13e9*1e3:.1f} ms/step floor")
flops = 2 * sum(p.numel() for p in m.parameters()) * B
print(f"  matmul flops/step {flops/1e9:.2f} GFLOP")
