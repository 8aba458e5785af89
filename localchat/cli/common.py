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
    p.add_argument("--model", default=None, help="model name from models.yaml (default: the registry's default)")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 on CPU; float16/bfloat16 on CUDA")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--block-size", type=int, default=settings.DEFAULT_BLOCK_SIZE, help="tokens per KV block")
    p.add_argument("--kv-cache-gb", type=float, default=None,
                   help=f"memory for the KV block pool (default: {settings.DEFAULT_CPU_KV_CACHE_GB:g} on CPU, "
                        f"{settings.DEFAULT_GPU_MEMORY_FRACTION:.0%} of free GPU memory on CUDA)".replace("%", "%%"))
    p.add_argument("--max-num-seqs", type=int, default=settings.DEFAULT_MAX_NUM_SEQS)
    p.add_argument("--max-num-batched-tokens", type=int, default=settings.DEFAULT_MAX_NUM_BATCHED_TOKENS)
    p.add_argument("--no-prefix-cache", action="store_true", help="recompute every prompt from scratch")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def engine_spec(args: argparse.Namespace) -> dict:
    """The engine the flags describe, as plain values (an engine process builds it from them)."""
    return {
        "model": args.model,
        "dtype": args.dtype,
        "device": args.device,
        "threads": args.threads,
        "config": {
            "block_size": args.block_size,
            "kv_cache_gb": args.kv_cache_gb,
            "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "enable_prefix_cache": not args.no_prefix_cache,
        },
    }


def build_engine(model: str | None, dtype: str | None, device: str | None, threads: int | None, config: dict):
    """Load the model and build its engine (raises ValueError subclasses for bad values or unknown models)."""
    import torch

    from localchat.engine import Engine, EngineConfig
    from localchat.model import default_dtype, load_model

    if threads:
        torch.set_num_threads(threads)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    engine_config = EngineConfig(**config)  # checked before the model loads
    loaded = load_model(model, dtype=dtype or default_dtype(device), device=device)
    return Engine.from_loaded(loaded, engine_config)


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
