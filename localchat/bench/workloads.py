"""What a bench run is made of: its sizes, the model it runs on, and the seeded workloads."""

from __future__ import annotations

import contextlib

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch


# ---- sizes -------------------------------------------------------------------------------------


@dataclass
class Sizes:
    num_requests: int = 64
    prompt_range: tuple[int, int] = (16, 1500)
    output_range: tuple[int, int] = (16, 512)
    hf_batch: int = 16
    decode_prompt: int = 32
    decode_tokens: int = 256
    decode_repeats: int = 3  # each side's figure is the median of this many runs (one noisy run can't decide it)
    decode_long_prompt: int = 1000  # decode at a long context: attention reads ~1,000 tokens of K/V per step
    quality_tokens: int = 64  # greedy reply length for the quality suite's agreement
    sharing_prompt: int = 1000
    sharing_tokens: int = 128
    multiturn_turns: int = 8
    multiturn_user_tokens: int = 150
    multiturn_reply_tokens: int = 32
    kv_cache_gb: float = 1.5
    max_num_batched_tokens: int = 1024
    # Equal-length batches generated together (llama.cpp's batched figure in design.md is of this kind).
    batched_seqs: tuple[int, ...] = (8, 64)
    batched_prompt: int = 128
    batched_tokens: int = 128
    # The page (localchat/bench/page.py): one greedy reply of page_tokens in the page and in `generate`,
    # page_repeats times each; regenerate with a history of page_history_tokens. On a shared two-core machine a
    # 256-token reply (~1.7 s) ran 0.76x-1.15x of the `generate` beside it in one run of five rounds, with the same
    # code; longer replies and more rounds make the medians hold still (benchmarks/NOTES.md session 16).
    page_tokens: int = 512
    page_repeats: int = 7
    page_history_tokens: int = 1500

    @classmethod
    def preset(cls, name: str) -> "Sizes":
        if name == "full":
            return cls()
        if name == "quick":
            return cls(
                num_requests=24, prompt_range=(16, 600), output_range=(16, 128), hf_batch=8, decode_tokens=64, quality_tokens=32,
                sharing_prompt=500, sharing_tokens=32, multiturn_turns=5, multiturn_user_tokens=100,
                multiturn_reply_tokens=16, kv_cache_gb=0.5, batched_seqs=(8,), batched_prompt=64, batched_tokens=64,
                page_tokens=128, page_repeats=1,
            )
        if name == "tiny":  # the smoke test's tiny model: seconds
            return cls(
                num_requests=6, prompt_range=(4, 40), output_range=(2, 12), hf_batch=4, decode_prompt=8,
                decode_tokens=8, decode_repeats=1, decode_long_prompt=60, quality_tokens=6, sharing_prompt=40, sharing_tokens=6, multiturn_turns=3, multiturn_user_tokens=12,
                multiturn_reply_tokens=4, kv_cache_gb=0.01, max_num_batched_tokens=64, batched_seqs=(2,),
                batched_prompt=6, batched_tokens=4, page_tokens=200, page_repeats=1, page_history_tokens=120,
            )
        raise ValueError(f"unknown size preset {name!r}")


# ---- what a bench runs on ----------------------------------------------------------------------


@dataclass
class BenchContext:
    loaded: Any  # localchat.model.LoadedModel: our engines are built on it
    hf_model: Any = None  # transformers model on the same weights and dtype (the baseline)
    gguf_path: str | None = None  # for llama.cpp, when it is installed
    reference: Any = None  # the float32 dequantization of the same weights (loaded when the quality suite asks)
    engine_defaults: dict = field(default_factory=dict)  # EngineConfig values every engine of the run gets (--attention)

    def float32_reference(self):
        if self.reference is None:
            from localchat.model import load_model

            self.reference = load_model(self.loaded.spec or self.model_name, device="cpu", weights="float32")
        return self.reference

    @property
    def hf_config(self) -> Any:
        return self.loaded.config

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def dtype(self) -> torch.dtype:
        return self.loaded.dtype

    @property
    def model_name(self) -> str:
        return self.loaded.name

    @property
    def weights(self) -> str:
        return getattr(self.loaded, "weights", str(self.loaded.dtype).removeprefix("torch."))

    @property
    def activations(self) -> str:
        return getattr(self.loaded, "activations", "float32")

    @contextlib.contextmanager
    def float32_activations(self):
        """Our model with exact float32 activations for a while, to measure what rounded ones gain and cost
        (a change only when `activations` is "int16" or "int8")."""
        native = self.loaded.model.native
        saved = native.activations
        native.activations = "float32"
        try:
            yield
        finally:
            native.activations = saved

    def engine(self, **config: Any):
        from localchat.engine import Engine, EngineConfig

        return Engine.from_loaded(self.loaded, EngineConfig(**{**self.engine_defaults, **config}))


def load_context(model_name: str | None, dtype: torch.dtype | str | None, weights: str | None = None,
                 activations: str | None = None) -> BenchContext:
    """Our model as a user would run it (a GGUF's own quantized weights by default on the CPU), and
    transformers on the same weights in the dtype of our dense path (the baseline)."""
    from transformers import AutoModelForCausalLM

    from localchat.model import load_model

    loaded = load_model(model_name, dtype=dtype, device="cpu", weights=weights, activations=activations)
    hf = AutoModelForCausalLM.from_pretrained(loaded.path, dtype=loaded.dtype).eval()
    return BenchContext(loaded=loaded, hf_model=hf, gguf_path=find_gguf(loaded.spec))


def find_gguf(spec) -> str | None:
    try:
        from localchat.model.files import source_dir

        if spec.gguf_file:
            path = source_dir(spec) / spec.gguf_file
            if path.exists():
                return str(path)
    except Exception:
        pass
    return None


# ---- workload ----------------------------------------------------------------------------------


def spread(rng: random.Random, lo: int, hi: int, median: float) -> int:
    """Log-normal lengths clipped to [lo, hi] (ShareGPT's prompts and replies are heavy-tailed)."""
    return int(min(hi, max(lo, round(rng.lognormvariate(math.log(median), 0.9)))))


def make_workload(sizes: Sizes, vocab_size: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt ids, output length) per request; seeded, so every run and every system gets the same."""
    rng = random.Random(seed)
    lo_p, hi_p = sizes.prompt_range
    lo_o, hi_o = sizes.output_range
    work = []
    # Avoid the lowest ids (special tokens in most vocabularies).
    first = min(100, vocab_size // 4)
    for _ in range(sizes.num_requests):
        plen = spread(rng, lo_p, hi_p, median=(lo_p * hi_p) ** 0.5 * 1.2)
        olen = spread(rng, lo_o, hi_o, median=(lo_o * hi_o) ** 0.5)
        work.append(([rng.randrange(first, vocab_size) for _ in range(plen)], olen))
    return work


def bench_params(max_tokens: int, **kw: Any):
    from localchat.engine import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=kw.pop("temperature", 0.0), ignore_eos=True, **kw)


def run_engine(engine, items: list[tuple[list[int], Any]]) -> tuple[float, dict[str, Any]]:
    """Submit every request at once and step to completion; returns (seconds, final outputs by id)."""
    reqs = [engine.make_request(prompt_token_ids=ids, params=p) for ids, p in items]
    t0 = time.perf_counter()
    for r in reqs:
        engine.add(r)
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    return time.perf_counter() - t0, finals


