"""The Triton kernels (kernels/triton_ops.py) against the PyTorch reference (kernels/torch_ops.py).

On a machine with CUDA and TRITON_INTERPRET unset they run natively on the GPU; everywhere else they run on
the CPU under Triton's interpreter, which must be switched on before triton compiles anything, hence the
environment is set at the very top of this module. The interpreter is slow: shapes are small and the
parameter lists cover the dimensions (dtype, GQA ratio, head dim, block size, split-K) in combination rather
than as a full product.

Every test draws fresh random inputs; the seed is in each failure message. Reproduce one with
LOCALCHAT_TEST_SEED=<seed> pytest tests/test_triton_kernels.py -k <test>.
"""

from __future__ import annotations

import os

import torch

NATIVE = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "") in ("", "0")
if not NATIVE:
    os.environ["TRITON_INTERPRET"] = "1"
DEVICE = "cuda" if NATIVE else "cpu"
# The imports below stay after the switch above: kernels.triton_ops compiles or interprets as it is imported.

import math
import random

import pytest
from conftest import skip_or_fail

from kernels import build_metadata, torch_ops

try:
    import triton  # noqa: F401

    from kernels import triton_ops
except ImportError as exc:  # pragma: no cover - depends on the machine
    triton_ops = None
    _IMPORT_ERROR = f"triton is not installed ({exc}): pip install triton"

TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def without_triton(test):
    """Marks a test that runs whether or not triton is installed."""
    test.needs_triton = False
    return test


@pytest.fixture(autouse=True)
def kernels_available(request, monkeypatch):
    if not getattr(request.function, "needs_triton", True):
        return
    if triton_ops is None:
        skip_or_fail(_IMPORT_ERROR)
    if not NATIVE and not triton_ops.interpreter_enabled():
        skip_or_fail("kernels.triton_ops was imported before TRITON_INTERPRET=1 was set: run this module on its own")
    # Split-K partials the reduction reads without their having been written would turn the output NaN.
    monkeypatch.setattr(triton_ops, "POISON_SCRATCH", True)
    monkeypatch.setattr(triton_ops, "SPLIT_K", None)


@pytest.fixture
def seed(request):
    value = int(os.environ.get("LOCALCHAT_TEST_SEED") or random.SystemRandom().randrange(2**31))
    print(f"{request.node.name}: seed {value} (LOCALCHAT_TEST_SEED={value} to reproduce)")
    return value


class Case:
    """Paged K/V for a batch of sequences, written the way the engine writes it, plus this step's queries.

    The Triton side runs on caches whose every slot starts as NaN (block 0, the tables' padding, included),
    so a read of a slot outside a sequence's context poisons its output. The reference runs on a copy
    whose unwritten slots hold random values instead: torch_ops multiplies masked slots by zero weights,
    and 0 * NaN would poison it too.
    """

    def __init__(self, seed, ctx_lens, q_lens, *, block_size, kv_heads, group, head_dim, dtype,
                 tables=None, num_blocks=None, layers=1):
        self.seed = seed
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.ctx_lens, self.q_lens = list(ctx_lens), list(q_lens)
        self.block_size, self.kv_heads, self.heads, self.head_dim, self.dtype = (
            block_size, kv_heads, kv_heads * group, head_dim, dtype)
        if tables is None:  # distinct, shuffled physical blocks per sequence
            need = [math.ceil(c / block_size) for c in ctx_lens]
            num_blocks = num_blocks or sum(need) + 3
            pool = list(range(1, num_blocks))  # never block 0: the tables' padding must not be read
            self.rng.shuffle(pool)
            tables, at = [], 0
            for n in need:
                tables.append(pool[at : at + n])
                at += n
        self.tables = tables
        self.num_blocks = num_blocks
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.k_ref = [self.randn(*shape) for _ in range(layers)]
        self.v_ref = [self.randn(*shape) for _ in range(layers)]
        self.k_tri = [torch.full(shape, float("nan"), dtype=dtype, device=DEVICE) for _ in range(layers)]
        self.v_tri = [torch.full(shape, float("nan"), dtype=dtype, device=DEVICE) for _ in range(layers)]
        # Each sequence's whole context; written position by position (a shared block is written once per
        # sequence with the same values only if the test makes them equal, see test_shared_blocks_and_cow).
        self.full_k = [self.randn(c, kv_heads, head_dim) for c in ctx_lens]
        self.full_v = [self.randn(c, kv_heads, head_dim) for c in ctx_lens]

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.gen).to(device=DEVICE, dtype=self.dtype)

    def slot(self, seq, pos):
        return self.tables[seq][pos // self.block_size] * self.block_size + pos % self.block_size

    def write(self, seqs_positions, layer=0):
        """Write K/V of (seq, position) pairs through both backends' write_kv."""
        if not seqs_positions:
            return
        slots = torch.tensor([self.slot(s, p) for s, p in seqs_positions], dtype=torch.long, device=DEVICE)
        key = torch.stack([self.full_k[s][p] for s, p in seqs_positions])
        value = torch.stack([self.full_v[s][p] for s, p in seqs_positions])
        torch_ops.write_kv(key, value, self.k_ref[layer], self.v_ref[layer], slots)
        triton_ops.write_kv(key, value, self.k_tri[layer], self.v_tri[layer], slots)

    def prepare_step(self):
        """The cached prefix is already in the pool; this step's tokens come through the metadata's slots."""
        self.write([(s, p) for s, (c, q) in enumerate(zip(self.ctx_lens, self.q_lens)) for p in range(c - q)])
        self.meta = build_metadata(self.tables, self.ctx_lens, self.q_lens, self.block_size, device=DEVICE)
        new = [(s, p) for s, (c, q) in enumerate(zip(self.ctx_lens, self.q_lens)) for p in range(c - q, c)]
        if new:
            key = torch.stack([self.full_k[s][p] for s, p in new])
            value = torch.stack([self.full_v[s][p] for s, p in new])
            torch_ops.write_kv(key, value, self.k_ref[0], self.v_ref[0], self.meta.slot_mapping)
            triton_ops.write_kv(key, value, self.k_tri[0], self.v_tri[0], self.meta.slot_mapping)
        # Queries as the model passes them: the first `heads` of a fused [T, heads + kv_heads, D] tensor.
        fused = self.randn(sum(self.q_lens), self.heads + self.kv_heads, self.head_dim)
        self.query = fused[:, : self.heads]
        self.scale = self.head_dim**-0.5
        return self.meta

    def run(self, **kwargs):
        out = torch.full((self.query.shape[0], self.heads, self.head_dim), float("nan"), dtype=self.dtype, device=DEVICE)
        got = triton_ops.paged_attention(self.query, self.k_tri[0], self.v_tri[0], self.meta, self.scale, out=out, **kwargs)
        assert got is out
        return out

    def reference(self):
        return torch_ops.paged_attention(self.query, self.k_ref[0], self.v_ref[0], self.meta, self.scale)

    def check(self, actual, expected=None, what="", tol=None):
        expected = self.reference() if expected is None else expected
        tol = TOL[self.dtype] if tol is None else tol
        assert not torch.isnan(actual).any(), f"{what}: NaN in the output (an unwritten element?); seed {self.seed}"
        torch.testing.assert_close(
            actual.float(), expected.float(), atol=tol, rtol=tol,
            msg=lambda m: f"{what} (seed {self.seed}, contexts {self.ctx_lens}, queries {self.q_lens}): {m}",
        )


def context_lens(rng, block_size, n):
    """Lengths around block boundaries, never a multiple of the block size, plus a short and a long one."""
    lens = [1, block_size - 1, block_size + 1, 3 * block_size + rng.randint(1, block_size - 1)]
    lens += [rng.randint(2, 6 * block_size) for _ in range(max(0, n - len(lens)))]
    lens = [c + 1 if c % block_size == 0 else c for c in lens]
    rng.shuffle(lens)
    return lens[:n]


# (dtype, GQA group, head_dim, block_size, split-K, partition size)
DECODE_CASES = [
    (torch.float32, 1, 64, 8, False, None),
    (torch.float32, 4, 128, 16, True, 32),
    (torch.float16, 3, 128, 16, True, 48),  # partitions that end inside a block
    (torch.float16, 1, 64, 32, False, None),
    (torch.bfloat16, 4, 64, 32, True, 64),
    (torch.bfloat16, 3, 128, 8, False, None),
]


@pytest.mark.parametrize("dtype,group,head_dim,block_size,split,partition", DECODE_CASES)
def test_decode(seed, dtype, group, head_dim, block_size, split, partition):
    rng = random.Random(seed)
    ctx = context_lens(rng, block_size, 5) + [rng.randint(130, 200)]  # several partitions
    case = Case(seed, ctx, [1] * len(ctx), block_size=block_size, kv_heads=2, group=group, head_dim=head_dim, dtype=dtype)
    assert case.prepare_step().is_decode_only
    case.check(case.run(split_k=split, partition_size=partition), what="decode")


def test_split_k_matches_unsplit(seed):
    rng = random.Random(seed)
    ctx = [rng.randint(1, 200) for _ in range(3)] + [199]
    case = Case(seed, ctx, [1] * len(ctx), block_size=16, kv_heads=2, group=3, head_dim=64, dtype=torch.float32)
    case.prepare_step()
    whole = case.run(split_k=False)
    case.check(whole, what="unsplit")
    for partition in (16, 80, 512):
        case.check(case.run(split_k=True, partition_size=partition), whole, what=f"split-K, partition {partition}", tol=1e-5)


def test_split_k_module_setting(seed, monkeypatch):
    calls = []
    real = triton_ops._reduce_kernel

    class Spy:
        def __getitem__(self, grid):
            calls.append(grid)
            return real[grid]

    monkeypatch.setattr(triton_ops, "_reduce_kernel", Spy())
    case = Case(seed, [40, 75], [1, 1], block_size=16, kv_heads=2, group=2, head_dim=64, dtype=torch.float16)
    case.prepare_step()
    monkeypatch.setattr(triton_ops, "SPLIT_K", True)
    monkeypatch.setattr(triton_ops, "PARTITION_SIZE", 32)
    case.check(case.run(), what="SPLIT_K=True")
    assert len(calls) == 1
    monkeypatch.setattr(triton_ops, "SPLIT_K", False)
    case.check(case.run(), what="SPLIT_K=False")
    assert len(calls) == 1


# (dtype, GQA group, head_dim, block_size)
PREFILL_CASES = [
    (torch.float32, 3, 64, 16),
    (torch.float16, 4, 128, 8),
    (torch.bfloat16, 1, 128, 32),
    (torch.bfloat16, 4, 64, 16),
]


@pytest.mark.parametrize("dtype,group,head_dim,block_size", PREFILL_CASES)
def test_prefill_after_prefix_hit(seed, dtype, group, head_dim, block_size):
    # Chunks shorter than their contexts (a prefix-cache hit, or a later chunk of a long prompt), a whole
    # prompt, and chunks longer than one tile of query tokens (a tile holds 64 rows, 32 in float32, of
    # tokens x the query heads sharing a KV head: 16 tokens when 4 heads share one).
    rng = random.Random(seed)
    ctx = [rng.randint(40, 90), rng.randint(20, 60), rng.randint(2, 30), 70]
    ctx = [c + 1 if c % block_size == 0 else c for c in ctx]
    q = [rng.randint(17, 39), rng.randint(2, 19), ctx[2], 66]
    case = Case(seed, ctx, q, block_size=block_size, kv_heads=2, group=group, head_dim=head_dim, dtype=dtype)
    assert not case.prepare_step().is_decode_only
    case.check(case.run(), what="prefill")


@pytest.mark.parametrize("dtype,group,head_dim,block_size,split", [
    (torch.float32, 4, 64, 8, True),
    (torch.float16, 3, 64, 32, False),
    (torch.bfloat16, 1, 128, 16, True),
])
def test_mixed_batch(seed, dtype, group, head_dim, block_size, split):
    # What the scheduler builds: decoding sequences next to a prompt, a prefix-hit chunk and a
    # single-token prompt; the single-token rows take the decode kernel (split-K too), the rest prefill.
    rng = random.Random(seed)
    ctx = [rng.randint(20, 50), rng.randint(30, 70), rng.randint(60, 140), rng.randint(2, 40), 1, rng.randint(5, 30)]
    q = [ctx[0], rng.randint(2, 12), 1, 1, 1, 1]
    case = Case(seed, ctx, q, block_size=block_size, kv_heads=2, group=group, head_dim=head_dim, dtype=dtype)
    case.prepare_step()
    case.check(case.run(split_k=split, partition_size=32), what="mixed batch")


def test_dispatch(seed, monkeypatch):
    calls = []
    for name in ("_decode", "_prefill"):
        real = getattr(triton_ops, name)
        monkeypatch.setattr(triton_ops, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1])
    decode = Case(seed, [9, 30], [1, 1], block_size=8, kv_heads=1, group=3, head_dim=64, dtype=torch.float32)
    decode.prepare_step()
    decode.check(decode.run(), what="decode-only")
    assert calls == ["_decode"]
    calls.clear()
    mixed = Case(seed, [9, 30, 12], [1, 5, 1], block_size=8, kv_heads=1, group=3, head_dim=64, dtype=torch.float32)
    mixed.prepare_step()
    mixed.check(mixed.run(), what="mixed")
    assert calls == ["_prefill", "_decode"]
    calls.clear()
    prompt = Case(seed, [9, 30], [9, 5], block_size=8, kv_heads=1, group=3, head_dim=64, dtype=torch.float32)
    prompt.prepare_step()
    # Default `out`: a fresh tensor of the query's dtype (contiguous even though the query isn't).
    prompt.check(triton_ops.paged_attention(prompt.query, prompt.k_tri[0], prompt.v_tri[0], prompt.meta, prompt.scale), what="prompts")
    assert calls == ["_prefill"]


def test_padding_sequence_is_finite(seed):
    # A padded decode slot: query length 1, context 0, slot -1 (tests/test_attention.py has the same case).
    gen = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(3, 8, 1, 64, generator=gen).to(DEVICE)
    v_cache = torch.randn(3, 8, 1, 64, generator=gen).to(DEVICE)
    meta = build_metadata([[1], [0]], [4, 0], [1, 0], block_size=8, device=DEVICE)
    meta.query_lens = [1, 1]
    meta.slot_mapping = torch.tensor([11, -1], device=DEVICE)
    before = k_cache.clone()
    triton_ops.write_kv(torch.ones(2, 1, 64, device=DEVICE), torch.ones(2, 1, 64, device=DEVICE), k_cache, v_cache, meta.slot_mapping)
    assert torch.equal(k_cache[1, 3, 0], torch.ones(64, device=DEVICE))
    assert ((k_cache != before).flatten(1).any(-1).nonzero().flatten().tolist()) == [1]
    query = torch.randn(2, 2, 64, generator=gen).to(DEVICE)
    for split in (False, True):
        out = torch.full_like(query, float("nan"))
        triton_ops.paged_attention(query, k_cache, v_cache, meta, 0.125, out=out, split_k=split, partition_size=16)
        assert torch.isfinite(out).all(), f"split {split}, seed {seed}"
        expected = torch_ops.paged_attention(query[:1], k_cache, v_cache, build_metadata([[1]], [4], [1], 8, device=DEVICE), 0.125)
        torch.testing.assert_close(out[:1], expected, atol=2e-5, rtol=2e-5, msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens_per_program", [1, 4])
def test_write_kv_matches_torch(seed, dtype, monkeypatch, tokens_per_program):
    # One token a program as on the GPU; several as whole models run under the interpreter (a partial last program).
    monkeypatch.setattr(triton_ops, "WRITE_TOKENS_PER_PROGRAM", tokens_per_program)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    num_blocks, block_size, kv_heads, head_dim = 6, 8, 3, 64
    slots = rng.sample(range(num_blocks * block_size), 10)
    slots[rng.randrange(10)] = -1
    slots[rng.randrange(10)] = -1
    slot_mapping = torch.tensor(slots, dtype=torch.long, device=DEVICE)
    # Non-contiguous rows, as the model passes them (views into a fused projection); float32 rows into a
    # bfloat16 cache are converted as torch_ops converts them.
    fused = torch.randn(10, 2 * kv_heads + 1, head_dim, generator=gen).to(DEVICE)
    key, value = fused[:, 1 : 1 + kv_heads], fused[:, 1 + kv_heads :]
    cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(device=DEVICE, dtype=dtype)
    k_ref, v_ref, k_tri, v_tri = cache.clone(), -cache, cache.clone(), -cache
    torch_ops.write_kv(key, value, k_ref, v_ref, slot_mapping)
    triton_ops.write_kv(key, value, k_tri, v_tri, slot_mapping)
    assert torch.equal(k_tri, k_ref) and torch.equal(v_tri, v_ref), f"seed {seed}"
    triton_ops.write_kv(key[:0], value[:0], k_tri, v_tri, slot_mapping[:0])  # an empty step is a no-op
    assert torch.equal(k_tri, k_ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_copy_blocks_every_layer(seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    shape = (7, 16, 2, 64)
    k_caches = [torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype) for _ in range(3)]
    v_caches = [torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype) for _ in range(3)]
    k_ref = [c.clone() for c in k_caches]
    v_ref = [c.clone() for c in v_caches]
    src = torch.tensor([1, 4], device=DEVICE)
    dst = torch.tensor([5, 2], device=DEVICE)
    triton_ops.copy_blocks(k_caches, v_caches, src, dst)
    torch_ops.copy_blocks(k_ref, v_ref, src, dst)
    assert all(torch.equal(a, b) for a, b in zip(k_caches + v_caches, k_ref + v_ref)), f"seed {seed}"
    # A block both a source and a destination: sources are read before any write (the torch fallback).
    triton_ops.copy_blocks(k_caches, v_caches, torch.tensor([1, 2]), torch.tensor([2, 6]))
    torch_ops.copy_blocks(k_ref, v_ref, torch.tensor([1, 2]), torch.tensor([2, 6]))
    assert all(torch.equal(a, b) for a, b in zip(k_caches + v_caches, k_ref + v_ref)), f"seed {seed}"
    triton_ops.copy_blocks(k_caches, v_caches, src[:0], dst[:0])
    assert all(torch.equal(a, b) for a, b in zip(k_caches + v_caches, k_ref + v_ref))


@pytest.mark.parametrize("dtype,block_size,split", [(torch.bfloat16, 16, True), (torch.float32, 8, False)])
def test_shared_blocks_and_cow(seed, dtype, block_size, split):
    """Two sequences forked from one prompt share its physical blocks, the partial last one included. The
    child then copies the last block (CoW) in every layer, writes its next token into the copy, and the
    parent must read exactly what it read before."""
    rng = random.Random(seed)
    prompt = rng.randint(2 * block_size + 1, 4 * block_size - 1)
    prompt += prompt % block_size == 0
    n = math.ceil(prompt / block_size)
    shared = rng.sample(range(1, 4 * n + 4), n)
    free = [b for b in range(1, 4 * n + 4) if b not in shared]
    case = Case(seed, [prompt, prompt], [1, 1], block_size=block_size, kv_heads=2, group=4, head_dim=64, dtype=dtype,
                tables=[list(shared), list(shared)], num_blocks=4 * n + 4, layers=3)
    case.full_k[1], case.full_v[1] = case.full_k[0], case.full_v[0]
    for layer in range(3):
        case.write([(0, p) for p in range(prompt)], layer)
    case.meta = build_metadata(case.tables, case.ctx_lens, [1, 1], block_size, device=DEVICE)
    case.query = case.randn(1, case.heads, case.head_dim).expand(2, -1, -1)  # the same query for both
    case.scale = case.head_dim**-0.5
    before = case.run(split_k=split, partition_size=16)
    case.check(before, what="shared blocks")
    assert torch.equal(before[0], before[1]), f"two tables over the same blocks read differently (seed {seed})"

    # CoW: the child's last block becomes a private copy in every layer.
    copy = free[0]
    src = torch.tensor([shared[-1]], device=DEVICE)
    dst = torch.tensor([copy], device=DEVICE)
    triton_ops.copy_blocks(case.k_tri, case.v_tri, src, dst)
    torch_ops.copy_blocks(case.k_ref, case.v_ref, src, dst)
    for cache in case.k_tri + case.v_tri:
        # Unwritten (NaN) slots of the partial block copy as NaN: compare bit patterns.
        assert torch.equal(cache[copy].view(torch.uint8), cache[shared[-1]].view(torch.uint8)), f"seed {seed}"
    case.tables[1] = shared[:-1] + [copy]
    # The child rewrites the prompt's last token in its copy and appends one there (a prompt length that is
    # not a multiple of the block size leaves room); the parent's block keeps the original.
    case.ctx_lens = [prompt, prompt + 1]
    case.full_k[1] = torch.cat([case.full_k[0][:-1], case.randn(2, case.kv_heads, case.head_dim)])
    case.full_v[1] = torch.cat([case.full_v[0][:-1], case.randn(2, case.kv_heads, case.head_dim)])
    case.write([(1, prompt - 1)])
    case.q_lens = [1, 1]
    case.meta = build_metadata(case.tables, case.ctx_lens, [1, 1], block_size, device=DEVICE)
    case.write([(1, prompt)])
    after = case.run(split_k=split, partition_size=16)
    case.check(after, what="after CoW")
    torch.testing.assert_close(after[0].float(), before[0].float(), atol=0, rtol=0,
                               msg=lambda m: f"the parent's output changed after the child's CoW write (seed {seed}): {m}")


def test_use_split_k_heuristic(monkeypatch):
    monkeypatch.setattr(triton_ops, "_sm_count", lambda index: 132)
    assert not triton_ops.use_split_k(1, 8, 512, "cuda:0")  # fits one partition
    assert triton_ops.use_split_k(1, 8, 2048, "cuda:0")  # 8 programs for 132 SMs
    assert not triton_ops.use_split_k(256, 8, 2048, "cuda:0")  # 2048 programs fill the GPU
    assert triton_ops.use_split_k(256, 8, 16384, "cuda:0")  # one context too long for one program
    assert triton_ops.use_split_k(1, 8, 300, "cuda:0", partition_size=128)
    monkeypatch.setattr(triton_ops, "SPLIT_K", False)
    assert not triton_ops.use_split_k(1, 8, 16384, "cuda:0")
    monkeypatch.setattr(triton_ops, "SPLIT_K", True)
    assert triton_ops.use_split_k(256, 8, 16, "cuda:0")


def test_register_routes_cuda_tensors(monkeypatch):
    import kernels

    monkeypatch.setattr(kernels, "_BACKENDS", dict(kernels._BACKENDS))
    triton_ops.register()
    assert kernels._BACKENDS["cuda"] is triton_ops
    assert kernels.backend_for(torch.empty(1)) is kernels.cpu_native


@without_triton
def test_triton_stays_optional():
    # Importing the package and its other backends must not import triton (kernels/__init__.py).
    import subprocess
    import sys

    code = (
        "import sys, kernels, kernels.torch_ops, kernels.cpu_native\n"
        "assert 'triton' not in sys.modules, sorted(m for m in sys.modules if 'triton' in m)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env)


# ------------------------------------------------------------------- benchmarks/gpu_check.py's helpers


def _gpu_check():
    import importlib.util
    import sys

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu_check.py")
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@without_triton
def test_gpu_check_helpers():
    g = _gpu_check()
    text = 'loading {model}...\n{\n  "outputs": [{"token_ids": [1, 2]}],\n  "memory": {"a": 1}\n}\n'
    assert g.parse_json_output(text) == {"outputs": [{"token_ids": [1, 2]}], "memory": {"a": 1}}
    assert g.parse_json_output('{"a": 1}\n{"b": 2}\n') == {"b": 2}
    assert g.parse_json_output("no json here") is None
    assert g.compare_ids([1, 2, 3], [1, 2, 3]) == (True, None)
    assert g.compare_ids([1, 2, 3], [1, 5, 3]) == (False, 1)
    assert g.compare_ids([1, 2], [1, 2, 3]) == (False, 2)
    assert g.pytest_summary("....\n===== 25 passed in 12.30s =====\n") == "25 passed in 12.30s"
    assert g.pytest_summary("") == "no pytest summary"
    kv = g.decode_kv_bytes(256, 2048, 8, 128, 2)
    assert kv == 2 * 256 * 2048 * 8 * 128 * 2
    # Reading N bytes in the time copy_ takes to read and write them is 50% of the copy's rate.
    assert g.copy_percentage(kv, 1.0, 1.0) == pytest.approx(50.0)
    assert g.copy_percentage(kv, 0.5, 1.0) == pytest.approx(100.0)
    table = g.format_table([g.StepResult("tests", "ok", 12.34, "25 passed"), g.StepResult("e2e", "FAIL", 1.0, "exit 2")])
    lines = table.splitlines()
    assert lines[0].split() == ["step", "status", "seconds", "detail"]
    assert lines[2].split() == ["tests", "ok", "12.3", "25", "passed"] and "FAIL" in lines[3]


@without_triton
def test_gpu_check_reports_failed_steps_and_goes_on(monkeypatch, capsys):
    g = _gpu_check()
    monkeypatch.setattr(g, "step_tests", lambda limit: (_ for _ in ()).throw(RuntimeError("boom")))
    monkeypatch.setattr(g, "step_decode", lambda limit: g.StepResult("decode", "ok", 1.0, "fine"))
    assert g.main(["--skip", "e2e", "throughput"]) == 1
    out = capsys.readouterr().out
    table = out[out.rindex("step") :].splitlines()
    assert [line.split()[:2] for line in table[2:]] == [["tests", "FAIL"], ["decode", "ok"], ["e2e", "skipped"], ["throughput", "skipped"]]
    assert "RuntimeError: boom" in table[2]
