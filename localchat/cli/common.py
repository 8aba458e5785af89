"""What the commands share: engine flags, sampling flags, and reporting bad input without a traceback."""

from __future__ import annotations

import argparse
import sys

from localchat import settings

SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "n", "beam_width", "length_penalty")


def error(message: str) -> int:
    """Print a one-line error for the user and return the exit code for bad input."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="a name from `localchat models list`, a model directory, or a .gguf file (default: the registry's default)")
    p.add_argument("--weights", default=None, choices=("gguf", "bfloat16", "float32", "float16"),
                   help="gguf: the GGUF file's own quantized weights (the default on the CPU for a GGUF model); "
                        "bfloat16/float32/float16: dense weights of that type (float32 is the exactness reference)")
    p.add_argument("--activations", default=None, choices=settings.ACTIVATIONS,
                   help="with gguf weights, where the CPU has AVX2 but not AVX-512: int16 (the default) rounds the quantized "
                        "matmuls' inputs to 16 bits per block of 32, ~1.3x faster decoding with float32's replies; float32 "
                        "keeps them exact; int8 rounds to 8 bits, a little faster still, at a cost in quality")
    p.add_argument("--dtype", default=None, help="dense weights' type: float32 or bfloat16 on CPU; float16/bfloat16 on CUDA")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--block-size", type=int, default=settings.DEFAULT_BLOCK_SIZE, help="tokens per KV block")
    p.add_argument("--kv-cache-gb", type=float, default=None,
                   help=f"memory for the KV block pool (default: {settings.DEFAULT_CPU_KV_CACHE_GB:g} on CPU, "
                        f"{settings.DEFAULT_GPU_MEMORY_FRACTION:.0%} of free GPU memory on CUDA)".replace("%", "%%"))
    p.add_argument("--max-num-seqs", type=int, default=settings.DEFAULT_MAX_NUM_SEQS)
    p.add_argument("--max-num-batched-tokens", type=int, default=settings.DEFAULT_MAX_NUM_BATCHED_TOKENS)
    p.add_argument("--max-model-len", type=int, default=None, help="the context a sequence may fill (default: the model's)")
    p.add_argument("--no-prefix-cache", action="store_true", help="recompute every prompt from scratch")
    p.add_argument("--attention", default="auto", choices=("auto", "torch", "triton"),
                   help="paged-attention kernels: auto (Triton on CUDA, native on the CPU), torch, or triton "
                        "(on the CPU under Triton's interpreter: slow, for checking)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def engine_spec(args: argparse.Namespace) -> dict:
    """The engine the flags describe, as plain values (an engine process builds it from them)."""
    return {
        "model": args.model,
        "dtype": args.dtype,
        "weights": args.weights,
        "activations": args.activations,
        "device": args.device,
        "threads": args.threads,
        "config": {
            "block_size": args.block_size,
            "kv_cache_gb": args.kv_cache_gb,
            "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "max_model_len": args.max_model_len,
            "enable_prefix_cache": not args.no_prefix_cache,
            "attention": args.attention,
        },
    }


def build_engine(model: str | None, dtype: str | None, device: str | None, threads: int | None, config: dict,
                 weights: str | None = None, activations: str | None = None):
    """Load the model and build its engine (raises ValueError subclasses for bad values or unknown models)."""
    import torch

    from localchat.engine import Engine, EngineConfig
    from localchat.model import load_model, resolve_model
    from localchat.model.loader import resolve_activations, resolve_weights

    if threads:
        torch.set_num_threads(threads)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    engine_config = EngineConfig(**config)  # checked before the model loads
    if engine_config.attention != "auto":
        # Before the model loads: importing transformers imports triton, and on the CPU the Triton kernels
        # only run if the interpreter is switched on before triton is first imported (kernels/__init__.py).
        from kernels import select_backend

        select_backend(engine_config.attention, torch.device(device).type)
    spec = resolve_model(model)
    weights, torch_dtype = resolve_weights(weights, dtype, spec, torch.device(device))
    resolve_activations(activations, weights)  # a bad choice is refused before the model loads
    check_memory(spec, torch_dtype, device, engine_config, weights)  # refuse now rather than be killed half way
    loaded = load_model(spec, dtype=dtype, device=device, weights=weights, activations=activations)
    return Engine.from_loaded(loaded, engine_config)


def check_memory(spec, dtype, device: str, engine_config, weights: str | None = None) -> None:
    """Raise a ValueError naming the largest value that fits if the weights, the KV pool and the batch's
    activations would not fit in this machine's memory (InsufficientMemoryError), or the context asked for
    is beyond the model's or the pool's."""
    from localchat.model.architectures import context_length
    from localchat.model.memory import context_problem, kv_bytes_per_token

    needs = memory_needs(spec, dtype, device, engine_config, weights)
    needs.check()
    pool = needs.kv_cache_bytes // kv_bytes_per_token(needs.config, dtype) if needs.kv_cache_bytes else None
    problem = context_problem(engine_config.max_model_len, context_length(needs.config, spec.context_length), pool)
    if problem:
        raise ValueError(problem)


def memory_needs(spec, dtype, device: str, engine_config, weights: str | None = None, converting: bool = True):
    """The memory estimate (localchat/model/memory.py) of an engine on `spec`: dense weights in `dtype`, the
    GGUF's own blocks too when they run ("gguf" weights), the KV pool the engine will allocate."""
    from localchat.engine.engine import kv_pool_bytes
    from localchat.model.loader import conversion_pending, model_config
    from localchat.model.architectures import context_length
    from localchat.model.memory import activation_costs, estimate, gguf_file_bytes

    config = model_config(spec)
    kv_bytes = kv_pool_bytes(engine_config, config, dtype, device)
    quantized = gguf_file_bytes(spec) if weights == "gguf" else 0
    context = engine_config.max_model_len or context_length(config, spec.context_length)
    batch = activation_costs(config, context, engine_config.max_num_batched_tokens, engine_config.max_num_seqs)
    return estimate(config, dtype, device, kv_bytes, converting=converting and conversion_pending(spec),
                    name=spec.name, extra_weight_bytes=quantized, batch=batch)


def swap_plan(spec: dict, new: str, current: str) -> str:
    """How to switch a running engine (built from `spec`) to model `new`: "alongside" when both fit in
    memory at once, "replace" when the new one fits only after the current one is released; raises
    InsufficientMemoryError (a ValueError) when it fits neither way."""
    import torch

    from localchat.engine import EngineConfig
    from localchat.model import resolve_model
    from localchat.model.loader import resolve_weights
    from localchat.model.memory import swap_order

    device = spec.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    engine_config = EngineConfig(**spec["config"])

    def needs(name: str, converting: bool):
        model = resolve_model(name)
        weights, dtype = resolve_weights(spec.get("weights"), spec.get("dtype"), model, torch.device(device))
        return memory_needs(model, dtype, device, engine_config, weights, converting)

    wanted = needs(new, converting=True)
    return swap_order(wanted, needs(current, converting=False) if not wanted.fits else None)


def engine_from_args(args: argparse.Namespace):
    return build_engine(**engine_spec(args))


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=settings.DEFAULT_MAX_TOKENS)
    p.add_argument("--temperature", type=float, default=settings.DEFAULT_TEMPERATURE)
    p.add_argument("--top-p", type=float, default=settings.DEFAULT_TOP_P)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--n", type=int, default=1, help="parallel samples sharing the prompt's blocks")
    p.add_argument("--beam-width", type=int, default=0, help="beam search with this many beams")
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--early-stopping", default="false", choices=["true", "false", "never"])


def sampling_from_args(args: argparse.Namespace, overrides: dict | None = None):
    from localchat.engine import SamplingParams

    values = {name: getattr(args, name) for name in SAMPLING_FLAGS}
    values["stop"] = tuple(args.stop)
    values["ignore_eos"] = args.ignore_eos
    values["early_stopping"] = {"true": True, "false": False, "never": "never"}[args.early_stopping]
    values.update(overrides or {})
    return SamplingParams.from_dict(values)
