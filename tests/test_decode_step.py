"""The native whole-step forward (kernels/decode_step.py, csrc/decode_step.cpp) against a float64 reference of
the same math on the dequantized weights: prompt chunks then decode tokens of two sequences through paged,
scattered blocks, GQA, with and without Qwen2's QKV bias and Qwen3's per-head norms, float32 and bfloat16
caches, several block types; each on the build this CPU gets, on the AVX2 build and on the portable one."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize as gguf_quantize

from conftest import skip_or_fail
from localchat import settings
from kernels import decode_step, quant
from kernels.quant import QuantizedWeight, matmul
from kernels.quant import library as quant_library

HIDDEN, HEADS, KV_HEADS, INTER, LAYERS = 128, 6, 2, 96, 2  # GQA: 3 query heads per KV head
EPS = 1e-5


@pytest.fixture(scope="module", autouse=True, params=["native", "avx2", "portable"])
def native(request):
    """Every test runs on the default build, on the AVX2 one (built without AVX-512) and on the portable one."""
    flags = {"native": decode_step.BUILD_FLAGS, "avx2": quant.AVX2_FLAGS, "portable": quant.PORTABLE_FLAGS}[request.param]
    if request.param == "avx2" and not (settings.cpu_has("avx2") and settings.cpu_has("fma")):
        pytest.skip("this CPU has no AVX2/FMA to run the AVX2 kernels on")
    if request.param == "avx2" and not settings.cpu_has("avx512f"):
        pytest.skip("the default build is the AVX2 one on this CPU: 'native' runs these kernels")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(decode_step, "BUILD_FLAGS", flags)
        lib = decode_step.library()
        if lib is None:
            skip_or_fail("the native decode step could not be built (needs g++)")
        lib.localchat_quant_isa.restype = ctypes.c_int
        if request.param != "native":
            assert {1: "avx512", 2: "avx2"}.get(lib.localchat_quant_isa(), "portable") == request.param
        yield request.param


def qweight(rng, qtype: Q, rows: int, cols: int) -> QuantizedWeight:
    values = (rng.standard_normal((rows, cols)) * 0.2).astype(np.float32)
    data = values if qtype == Q.F32 else gguf_quantize(values, qtype)
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(rows, -1)
    return QuantizedWeight(torch.from_numpy(raw.copy()), int(qtype), rows, cols)


def make_layers(rng, qtype: Q, bias: bool, qk_norm: bool, hd: int = 32):
    layers = []
    for _ in range(LAYERS):
        q, kv = HEADS * hd, KV_HEADS * hd
        ws = dict(q=qweight(rng, qtype, q, HIDDEN), k=qweight(rng, qtype, kv, HIDDEN), v=qweight(rng, qtype, kv, HIDDEN),
                  o=qweight(rng, qtype, HIDDEN, q), gate=qweight(rng, qtype, INTER, HIDDEN), up=qweight(rng, qtype, INTER, HIDDEN),
                  down=qweight(rng, Q.Q8_0 if qtype != Q.F32 else Q.F32, HIDDEN, INTER))
        extra = dict(
            attn_norm=torch.from_numpy(rng.uniform(0.5, 1.5, HIDDEN).astype(np.float32)),
            ffn_norm=torch.from_numpy(rng.uniform(0.5, 1.5, HIDDEN).astype(np.float32)),
            qkv_bias=torch.from_numpy(rng.standard_normal(q + 2 * kv).astype(np.float32)) if bias else None,
            q_norm=torch.from_numpy(rng.uniform(0.5, 1.5, hd).astype(np.float32)) if qk_norm else None,
            k_norm=torch.from_numpy(rng.uniform(0.5, 1.5, hd).astype(np.float32)) if qk_norm else None,
        )
        layers.append({**ws, **extra})
    return layers


def rmsnorm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + EPS))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return torch.cat((a * cos - b * sin, b * cos + a * sin), -1)


LIMITS = {"int8": 127.0, "int16": 127.0 * 255 + 127}  # the largest code of each width (csrc/integer_activations.h)


def integer_rounded(a: torch.Tensor, activations: str) -> torch.Tensor:
    """A float64 row as the integer-activation kernels see it: its float32 values, each block of 32 rounded to
    8 or 16 bits (as tests/test_quant_matmul.py's integer_rounded)."""
    limit = torch.tensor(LIMITS[activations])
    blocks = a.float().view(-1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, limit / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inv).double() * (amax / limit).double()).view(a.shape)


class Reference:
    """The same forward in float64, with each sequence's K/V history kept densely (rounded like the cache)."""

    def __init__(self, layers, kv_dtype, hd, activations="float32"):
        self.hd = hd
        self.activations = activations
        # Which weights' inputs the kernels round per block of 32 (kernels/quant.py integer_types()).
        rounded = quant.integer_types(decode_step.library()) if activations != "float32" else frozenset()
        self.rounds = [{k for k, v in layer.items() if isinstance(v, QuantizedWeight) and v.qtype in rounded} for layer in layers]
        self.layers = [{k: (v.dequantize(torch.float32).double() if isinstance(v, QuantizedWeight) else (None if v is None else v.double()))
                        for k, v in layer.items()} for layer in layers]
        self.kv_dtype = kv_dtype
        self.history: dict[int, list[list[torch.Tensor]]] = {}

    def token(self, seq: int, x: torch.Tensor, cos, sin) -> torch.Tensor:
        hd = self.hd
        hist = self.history.setdefault(seq, [[] for _ in self.layers])
        for L, h_kv, rounds in zip(self.layers, hist, self.rounds):
            def mm(a: torch.Tensor, name: str) -> torch.Tensor:
                return (integer_rounded(a, self.activations) if name in rounds else a) @ L[name].T

            h = rmsnorm(x, L["attn_norm"])
            qkv = torch.cat([mm(h, "q"), mm(h, "k"), mm(h, "v")])
            if L["qkv_bias"] is not None:
                qkv = qkv + L["qkv_bias"]
            q = qkv[: HEADS * hd].view(HEADS, hd)
            k = qkv[HEADS * hd : (HEADS + KV_HEADS) * hd].view(KV_HEADS, hd)
            v = qkv[(HEADS + KV_HEADS) * hd :].view(KV_HEADS, hd)
            if L["q_norm"] is not None:
                q, k = rmsnorm(q, L["q_norm"]), rmsnorm(k, L["k_norm"])
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            # float64 -> float32 -> cache dtype, as the kernel rounds (a direct float64 -> bfloat16 rounding
            # differs by one bfloat16 step now and then).
            h_kv.append((k.float().to(self.kv_dtype).double(), v.float().to(self.kv_dtype).double()))
            keys = torch.stack([kk for kk, _ in h_kv])  # [P, KV, D]
            values = torch.stack([vv for _, vv in h_kv])
            group = HEADS // KV_HEADS
            out = []
            for head in range(HEADS):
                g = head // group
                scores = (keys[:, g] @ q[head]) * hd**-0.5
                out.append(torch.softmax(scores, 0) @ values[:, g])
            x = x + mm(torch.cat(out), "o")
            h = rmsnorm(x, L["ffn_norm"])
            gate, up = mm(h, "gate"), mm(h, "up")
            x = x + mm(torch.nn.functional.silu(gate) * up, "down")
        return x


@pytest.mark.parametrize(
    "qtype, bias, qk_norm, kv_dtype, block_size, hd",
    [
        (Q.F32, False, False, torch.float32, 4, 32),
        (Q.Q4_1, True, False, torch.bfloat16, 16, 64),
        (Q.Q4_0, False, True, torch.float32, 1, 64),
        (Q.Q8_0, True, True, torch.bfloat16, 4, 128),
        (Q.Q4_1, False, False, torch.float32, 16, 128),
    ],
)
def test_step_matches_a_float64_reference(qtype, bias, qk_norm, kv_dtype, block_size, hd):
    check_steps(qtype, bias, qk_norm, kv_dtype, block_size, hd, activations="float32")


@pytest.mark.parametrize("activations", ["int16", "int8"])
@pytest.mark.parametrize("qtype, bias, qk_norm, kv_dtype", [(Q.Q4_1, True, False, torch.bfloat16), (Q.Q4_0, False, True, torch.float32)])
def test_integer_activations_step_matches_a_reference_with_rounded_inputs(qtype, bias, qk_norm, kv_dtype, activations):
    """With int16 or int8 activations every matmul of the step rounds its input (the kernels of this build that
    have such a path); a reference that rounds the same inputs agrees as closely as the float32 one does without."""
    # A fixed seed: the reference rounds float64 values where the kernels round float32 ones, and with some
    # seeds an input lands on the other side of a rounding boundary early enough to move many outputs.
    check_steps(qtype, bias, qk_norm, kv_dtype, 16, 64, activations=activations, seed=int(qtype))


def check_steps(qtype, bias, qk_norm, kv_dtype, block_size, hd, activations, seed=None):
    seed = int(np.random.SeedSequence().entropy % 2**31) if seed is None else seed
    rng = np.random.default_rng(seed)
    layers = make_layers(rng, qtype, bias, qk_norm, hd)
    num_blocks = 64 // block_size + 40
    shape = (num_blocks, block_size, KV_HEADS, hd)
    caches = [(torch.full(shape, float("nan"), dtype=kv_dtype), torch.full(shape, float("nan"), dtype=kv_dtype)) for _ in layers]
    plan = decode_step.StepPlan(
        [decode_step.LayerTensors(**{k: v for k, v in L.items()}, k_cache=kc, v_cache=vc) for L, (kc, vc) in zip(layers, caches)],
        hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS, head_dim=hd, inter=INTER, eps=EPS, scale=hd**-0.5,
    )
    ref = Reference(layers, kv_dtype, hd, activations)
    exact = Reference(layers, kv_dtype, hd) if ref.rounds[0] else None
    # Two sequences with scattered, interleaved physical blocks; each table padded to the same width.
    free = list(rng.permutation(num_blocks))
    tables = {0: [int(free.pop()) for _ in range(12)], 1: [int(free.pop()) for _ in range(12)]}
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    lengths = {0: 0, 1: 0}
    # A 7-token prompt chunk of sequence 0 with a 1-token decode of sequence 1 in the same step, then decode steps
    # of both, then another chunk: every token names its own table row and context.
    schedule = [[(0, 7), (1, 1)], [(0, 1), (1, 5)], [(0, 1), (1, 1)], [(1, 3)], [(0, 2), (1, 1)]]
    if activations != "float32":  # one step: a rounding flip (below) would otherwise reach every later step through K/V
        schedule = schedule[:1]
    for step in schedule:
        tokens = [(seq, lengths[seq] + i) for seq, n in step for i in range(n)]
        T = len(tokens)
        x = torch.from_numpy(rng.standard_normal((T, HIDDEN)).astype(np.float32))
        pos = torch.tensor([p for _, p in tokens], dtype=torch.float64)
        freqs = pos[:, None] * inv_freq[None, :]
        cos, sin = freqs.cos(), freqs.sin()
        bs = block_size
        slots = torch.tensor([tables[s][p // bs] * bs + p % bs for s, p in tokens], dtype=torch.int64)
        block_tables = torch.tensor([tables[0], tables[1]], dtype=torch.int32)
        token_table = torch.tensor([s for s, _ in tokens], dtype=torch.int32)
        token_ctx = torch.tensor([p + 1 for _, p in tokens], dtype=torch.int32)
        expected = torch.stack([ref.token(s, x[i].double(), cos[i], sin[i]) for i, (s, _) in enumerate(tokens)])
        got = plan.run(x.clone(), cos.float().contiguous(), sin.float().contiguous(), slots, block_tables, token_table,
                       token_ctx, activations)
        assert torch.isfinite(got).all(), f"seed {seed}: a NaN (an unwritten or misread cache slot)"
        # A bfloat16 cache holds K/V to 8 bits: float32 and float64 K land on different sides of a rounding boundary
        # now and then, and that one step of 0.4% shows in the output. A wrong slot, head or block is off by O(1).
        bf16 = kv_dtype == torch.bfloat16
        if exact is None:
            atol, rtol = (0.1, 2e-2) if bf16 else (2e-4, 1e-3)
            torch.testing.assert_close(got.double(), expected, atol=atol, rtol=rtol, msg=lambda m: f"seed {seed}: {m}")
        else:
            float_run = plan.run(x.clone(), cos.float().contiguous(), sin.float().contiguous(), slots, block_tables,
                                 token_table, token_ctx, "float32")
            check_rounded_step(got, expected, exact, x, tokens, cos, sin, activations, seed, float_run, bf16)
        for seq, n in step:
            lengths[seq] += n


def check_rounded_step(got, expected, exact, x, tokens, cos, sin, activations, seed, float_run, bf16):
    unrounded = torch.stack([exact.token(s, x[i].double(), cos[i], sin[i]) for i, (s, _) in enumerate(tokens)])
    near, far = (got.double() - expected).abs(), (got.double() - unrounded).abs()
    if activations == "int8":
        # The reference rounds its float64 values, the kernels their float32 ones, so now and then one input
        # lands on the other side of a rounding boundary and moves a few outputs by a code step. Typical
        # outputs sit within float32 rounding of the rounded reference, and far from the unrounded one (a
        # matmul that ignored the choice would sit close to it).
        assert near.median() < 1e-3 * far.median(), f"seed {seed}: {near.median()} vs {far.median()}"
        close, close_unrounded = ((d <= 2e-4 + 1e-3 * expected.abs()).double().mean() for d in (near, far))
        assert close > max(0.3, 4 * close_unrounded), f"seed {seed}: {close} vs {close_unrounded}"
        return
    # 16-bit codes are 256 times finer, and float32's own noise moves inputs across their boundaries almost as
    # often as the rounding moves outputs: the rounded reference is closer, not much closer
    # (tests/test_quant_matmul.py checks each matmul's rounding exactly). What a step must show: it rounds (it
    # is not the float32 run), and stays within a few times float32's tolerance of the exact forward, where
    # 8 bits land ~500 times farther off.
    assert not torch.equal(got, float_run)
    assert near.median() < far.median(), f"seed {seed}: {near.median()} vs {far.median()}"
    atol, rtol = (0.1, 2e-2) if bf16 else (5e-3, 5e-3)
    torch.testing.assert_close(got.double(), unrounded, atol=atol, rtol=rtol, msg=lambda m: f"seed {seed}: {m}")


def test_batched_rows_are_bitwise_the_rows_alone():
    rng, hd = np.random.default_rng(1), 64
    layers = make_layers(rng, Q.Q4_1, True, False, hd)
    shape = (32, 16, KV_HEADS, hd)

    def fresh_plan():
        caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in layers]
        return decode_step.StepPlan(
            [decode_step.LayerTensors(**L, k_cache=kc, v_cache=vc) for L, (kc, vc) in zip(layers, caches)],
            hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS, head_dim=hd, inter=INTER, eps=EPS, scale=hd**-0.5)

    x = torch.from_numpy(rng.standard_normal((3, HIDDEN)).astype(np.float32))
    cos, sin = torch.ones(3, hd // 2), torch.zeros(3, hd // 2)
    tables = torch.tensor([[0, 1], [2, 3], [4, 5]], dtype=torch.int32)
    together = fresh_plan().run(x.clone(), cos, sin, torch.tensor([0, 32, 64]), tables,
                                torch.tensor([0, 1, 2], dtype=torch.int32), torch.ones(3, dtype=torch.int32))
    for i in range(3):
        alone = fresh_plan().run(x[i : i + 1].clone(), cos[:1], sin[:1], torch.tensor([32 * i]), tables[i : i + 1],
                                 torch.zeros(1, dtype=torch.int32), torch.ones(1, dtype=torch.int32))
        assert torch.equal(alone[0], together[i])


def test_bad_descriptions_are_refused():
    rng, hd = np.random.default_rng(2), 32
    layers = make_layers(rng, Q.Q4_1, False, False)
    shape = (8, 16, KV_HEADS, hd)
    wrong = dict(layers[0], o=qweight(rng, Q.Q4_1, HIDDEN + 32, HEADS * hd))  # o with the wrong rows
    plan = decode_step.StepPlan([decode_step.LayerTensors(**wrong, k_cache=torch.zeros(shape), v_cache=torch.zeros(shape))],
                                hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS, head_dim=hd, inter=INTER, eps=EPS, scale=1.0)
    with pytest.raises(ValueError, match="wrong number of rows"):
        plan.run(torch.zeros(1, HIDDEN), torch.ones(1, 16), torch.zeros(1, 16), torch.tensor([0]),
                 torch.zeros(1, 1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32), torch.ones(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="caches"):
        decode_step.StepPlan([decode_step.LayerTensors(**layers[0], k_cache=torch.zeros(shape, dtype=torch.float16),
                                                       v_cache=torch.zeros(shape, dtype=torch.float16))],
                             hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS, head_dim=hd, inter=INTER, eps=EPS, scale=1.0)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
def test_one_token_over_a_long_context_splits_positions_across_threads(kv_dtype, monkeypatch):
    """A decode row at a context of a few hundred tokens: each thread attends over its share of the positions
    and the partial softmaxes are merged (csrc/decode_step.cpp attention_split)."""
    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng, hd = np.random.default_rng(seed), 64
    layers = make_layers(rng, Q.Q4_1, True, True, hd)
    block_size, length = 16, 300
    shape = (length // block_size + 4, block_size, KV_HEADS, hd)
    caches = [(torch.full(shape, float("nan"), dtype=kv_dtype), torch.full(shape, float("nan"), dtype=kv_dtype)) for _ in layers]
    plan = decode_step.StepPlan(
        [decode_step.LayerTensors(**L, k_cache=kc, v_cache=vc) for L, (kc, vc) in zip(layers, caches)],
        hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS, head_dim=hd, inter=INTER, eps=EPS, scale=hd**-0.5)
    ref = Reference(layers, kv_dtype, hd)
    table = list(rng.permutation(shape[0])[: length // block_size + 1])
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    x = torch.from_numpy(rng.standard_normal((length, HIDDEN)).astype(np.float32))
    freqs = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = freqs.cos().float(), freqs.sin().float()
    slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(length)])
    tables = torch.tensor([table], dtype=torch.int32)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the split needs more than one thread
    plan.run(x[:-1].clone(), cos[:-1].contiguous(), sin[:-1].contiguous(), slots[:-1], tables,
             torch.zeros(length - 1, dtype=torch.int32), torch.arange(1, length, dtype=torch.int32))
    for p in range(length - 1):
        ref.token(0, x[p].double(), freqs[p].cos(), freqs[p].sin())
    expected = ref.token(0, x[-1].double(), freqs[-1].cos(), freqs[-1].sin())
    got = plan.run(x[-1:].clone(), cos[-1:].contiguous(), sin[-1:].contiguous(), slots[-1:], tables,
                   torch.zeros(1, dtype=torch.int32), torch.full((1,), length, dtype=torch.int32))
    bf16 = kv_dtype == torch.bfloat16
    torch.testing.assert_close(got[0].double(), expected, atol=0.1 if bf16 else 2e-4, rtol=2e-2 if bf16 else 1e-3,
                               msg=lambda m: f"seed {seed}: {m}")


def _chunks_debug(lib):
    fn = lib.localchat_chunks_debug
    fn.restype, fn.argtypes = ctypes.c_int64, [ctypes.c_int64]
    return fn


def test_chunks_run_twice_or_late_write_the_same_bits(monkeypatch):
    """A phase's chunk that stays claimed is run again by a waiting thread, while its owner may still be running
    it (csrc/quant_matmul.cpp chunks::share). Forced here for every chunk a thread waits on, with 8 threads on
    the machine's cores (so owners are descheduled mid-chunk): outputs and caches must be bitwise those of one
    thread, for prompt rows and decode rows, and the LM-head matmul alike."""
    rng, hd = np.random.default_rng(5), 64
    layers = make_layers(rng, Q.Q4_1, True, True, hd)
    shape = (32, 16, KV_HEADS, hd)
    x = torch.from_numpy(rng.standard_normal((5, HIDDEN)).astype(np.float32))
    cos, sin = torch.from_numpy(rng.standard_normal((5, hd // 2)).astype(np.float32)), torch.ones(5, hd // 2)
    tables = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    slots = torch.tensor([0, 1, 2, 32, 3])
    token_table, token_ctx = torch.tensor([0, 0, 0, 1, 0], dtype=torch.int32), torch.tensor([1, 2, 3, 1, 4], dtype=torch.int32)
    head = qweight(rng, Q.Q8_0, 4000, HIDDEN)

    def run(threads: int):
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        caches = [(torch.zeros(shape, dtype=torch.bfloat16), torch.zeros(shape, dtype=torch.bfloat16)) for _ in layers]
        plan = decode_step.StepPlan(
            [decode_step.LayerTensors(**L, k_cache=kc, v_cache=vc) for L, (kc, vc) in zip(layers, caches)],
            hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS, head_dim=hd, inter=INTER, eps=EPS, scale=hd**-0.5)
        prompt = plan.run(x[:4].clone(), cos[:4], sin[:4], slots[:4], tables, token_table[:4], token_ctx[:4])
        decode = plan.run(x[4:].clone(), cos[4:], sin[4:], slots[4:], tables[:1], token_table[4:], token_ctx[4:])
        logits = matmul(torch.cat([prompt, decode]), head)
        return [prompt, decode, logits, *(c for pair in caches for c in pair)]

    expected = run(1)
    step_debug, matmul_debug = _chunks_debug(decode_step.library()), _chunks_debug(quant_library())
    before = step_debug(0) + matmul_debug(0)
    try:
        for _ in range(20):
            for want, got in zip(expected, run(8)):
                assert torch.equal(want, got)
    finally:
        after = step_debug(-1) + matmul_debug(-1)
    assert after - before > 100, "hardly any chunk ran twice: the test did not test it"


def test_step_computes_rope_and_the_final_norm_when_asked():
    """With rope's positions and frequencies instead of cos/sin, and the final norm's weight, a step gives what
    the same step with torch's cos/sin gives, normalized by torch's rms_norm: float32 rounding apart."""
    rng = np.random.default_rng(7)
    hd = 64
    layers = make_layers(rng, Q.Q4_1, False, False, hd)
    shape = (8, 16, KV_HEADS, hd)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in layers]
    plan = decode_step.StepPlan(
        [decode_step.LayerTensors(**L, k_cache=kc, v_cache=vc) for L, (kc, vc) in zip(layers, caches)],
        hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS, head_dim=hd, inter=INTER, eps=EPS, scale=hd**-0.5,
    )
    positions = torch.arange(5, dtype=torch.int64) + 40
    inv_freq = (1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))).contiguous()
    scaling = 0.9
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = (freqs.cos() * scaling).contiguous(), (freqs.sin() * scaling).contiguous()
    args = (torch.tensor([0] * 5, dtype=torch.int64) + torch.arange(5) + 40, torch.tensor([[0, 1, 2, 3]], dtype=torch.int32),
            torch.zeros(5, dtype=torch.int32), (positions + 1).to(torch.int32))
    final_norm = torch.from_numpy(rng.standard_normal(HIDDEN).astype(np.float32))
    x = torch.from_numpy(rng.standard_normal((5, HIDDEN)).astype(np.float32))
    given = plan.run(x.clone(), cos, sin, *args)
    expected = final_norm * torch.nn.functional.rms_norm(given, (HIDDEN,), eps=EPS)
    got = plan.run(x.clone(), None, None, *args, rope=(positions, inv_freq, scaling), final_norm=final_norm)
    assert not torch.equal(got, given)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="cos and sin, or rope"):
        plan.run(x.clone(), cos, sin, *args, rope=(positions, inv_freq, scaling))
