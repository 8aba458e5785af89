"""What users would run instead, measured in the same run: transformers' `generate` and, when
llama-cpp-python is installed, llama.cpp on the same GGUF (never a dependency)."""

from __future__ import annotations

import importlib.util
import time
from typing import Any

import torch

from localchat.bench.workloads import BenchContext


# ---- transformers baseline ---------------------------------------------------------------------


def hf_generate_batch(hf_model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> tuple[torch.Tensor, Any]:
    """Static batch as users run it: left padding to the longest prompt, every row runs `new_tokens` steps."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.inference_mode():
        out = hf_model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=pad_id, return_dict_in_generate=True, use_cache=True,
        )
    return out.sequences[:, width:], out.past_key_values


def cache_bytes(cache: Any) -> int:
    total = 0
    seen: set[int] = set()

    def visit(obj: Any, depth: int = 0) -> None:
        nonlocal total
        if depth > 4 or obj is None:
            return
        if isinstance(obj, torch.Tensor):
            if id(obj) not in seen:
                seen.add(id(obj))
                total += obj.numel() * obj.element_size()
            return
        if isinstance(obj, (list, tuple)):
            for o in obj:
                visit(o, depth + 1)
            return
        layers = getattr(obj, "layers", None)
        if layers is not None:
            for layer in layers:
                visit(getattr(layer, "keys", None), depth + 1)
                visit(getattr(layer, "values", None), depth + 1)
            return
        for name in ("key_cache", "value_cache"):
            visit(getattr(obj, name, None), depth + 1)

    visit(cache)
    return total


# ---- llama.cpp (optional) ----------------------------------------------------------------------


def llama_cpp_model(ctx: BenchContext):
    if ctx.gguf_path is None or importlib.util.find_spec("llama_cpp") is None:
        return None
    cached = getattr(ctx, "_llama", None)
    if cached is None:
        from llama_cpp import Llama  # type: ignore

        cached = Llama(model_path=ctx.gguf_path, n_ctx=4096, n_threads=torch.get_num_threads(), n_batch=512, verbose=False)
        ctx._llama = cached  # type: ignore[attr-defined]
    return cached


def llama_cpp_generate(llama, prompt: list[int], n: int, temperature: float = 0.0, top_p: float = 1.0) -> int:
    """n tokens of llama.cpp's own sampling loop: greedy, or temperature and top-p alone (its other samplers,
    top-k 40 and min-p 0.05 by default in llama-cpp-python, off as they are in ours)."""
    llama.reset()
    count = 0
    for _ in llama.generate(prompt, temp=temperature, top_p=top_p, top_k=0, min_p=0.0, reset=True):
        count += 1
        if count >= n:
            break
    return count


def llama_cpp_decode(llama, prompt: list[int], n: int, **sampling) -> float:
    llama_cpp_generate(llama, prompt, 2, **sampling)
    t0 = time.perf_counter()
    llama_cpp_generate(llama, prompt, 1, **sampling)
    t1 = time.perf_counter()
    llama_cpp_generate(llama, prompt, n, **sampling)
    t2 = time.perf_counter()
    return (n - 1) / max((t2 - t1) - (t1 - t0), 1e-9)


def llama_cpp_throughput(llama, work: list[tuple[list[int], int]]) -> float:
    # llama-cpp-python's high-level API serves one sequence at a time; that is how users run it.
    t0 = time.perf_counter()
    total = sum(llama_cpp_generate(llama, p[:4000], o) for p, o in work)
    return total / (time.perf_counter() - t0)


def llama_cpp_perplexity(gguf_path: str, ids: list[int]) -> float | None:
    """llama.cpp's perplexity of token_ids[1:] (the same ids as ours), or None without llama-cpp-python."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    import numpy as np
    from llama_cpp import Llama  # type: ignore

    with quiet_llama_cpp():
        llama = Llama(model_path=gguf_path, n_ctx=max(512, len(ids) + 16), n_threads=torch.get_num_threads(),
                      n_batch=512, logits_all=True, verbose=False)
    llama.reset()
    llama.eval(ids)
    logits = np.asarray(llama.scores[: len(ids) - 1], dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    nll = -logprobs[np.arange(len(ids) - 1), ids[1:]].mean()
    return float(np.exp(nll))


def quiet_llama_cpp():
    """llama.cpp logs every tensor it loads to stderr; its Python package mutes that this way."""
    try:
        from llama_cpp._utils import suppress_stdout_stderr  # type: ignore

        return suppress_stdout_stderr(disable=False)
    except ImportError:  # pragma: no cover
        from contextlib import nullcontext

        return nullcontext()


def llama_cpp_batched(gguf_path: str, prompts: list[list[int]], new_tokens: int) -> float:
    """llama.cpp's own batched decoding (one context, a sequence id per request, greedy): total tokens/s.

    llama-cpp-python's high-level API runs one sequence, so this drives the C API as llama.cpp's
    `batched` example does: one llama_decode for all prompts, then one per step with a token per sequence.
    """
    import itertools

    import llama_cpp  # type: ignore
    import numpy as np

    n = len(prompts)
    with quiet_llama_cpp():
        llama_cpp.llama_backend_init()
        model = llama_cpp.llama_model_load_from_file(gguf_path.encode(), llama_cpp.llama_model_default_params())
        if not model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = sum(len(p) for p in prompts) + n * (new_tokens + 1)
        ctx_params.n_batch = max(ctx_params.n_ctx, 512)
        ctx_params.n_ubatch = 512
        ctx_params.n_seq_max = n
        ctx_params.n_threads = ctx_params.n_threads_batch = torch.get_num_threads()
        lctx = llama_cpp.llama_init_from_model(model, ctx_params)
        batch = llama_cpp.llama_batch_init(max(ctx_params.n_ctx, n), 0, 1)
        try:
            vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))

            def decode(items: list[tuple[int, int, int, bool]]) -> None:  # (token, position, sequence, wants logits)
                batch.n_tokens = len(items)
                for i, (tok, pos, seq, logits) in enumerate(items):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
                    batch.seq_id[i][0] = seq
                    batch.logits[i] = logits
                if llama_cpp.llama_decode(lctx, batch) != 0:
                    raise RuntimeError("llama_decode failed")

            def greedy(index: int) -> int:
                ptr = llama_cpp.llama_get_logits_ith(lctx, index)
                return int(np.ctypeslib.as_array(ptr, shape=(vocab,)).argmax())

            t0 = time.perf_counter()
            decode([(tok, pos, s, pos == len(p) - 1) for s, p in enumerate(prompts) for pos, tok in enumerate(p)])
            tokens = [greedy(end - 1) for end in itertools.accumulate(len(p) for p in prompts)]
            for step in range(1, new_tokens):
                decode([(tokens[s], len(prompts[s]) - 1 + step, s, True) for s in range(n)])
                tokens = [greedy(s) for s in range(n)]
            return n * new_tokens / (time.perf_counter() - t0)
        finally:
            llama_cpp.llama_batch_free(batch)
            llama_cpp.llama_free(lctx)
            llama_cpp.llama_model_free(model)


