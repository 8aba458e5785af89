"""Command line: `python -m localchat generate | chats | bench | serve`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "n", "beam_width", "length_penalty")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model name from models.yaml (default: the registry's default)")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 on CPU; float16/bfloat16 on CUDA")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--kv-cache-gb", type=float, default=None, help="memory for the KV block pool (default: 1 on CPU, 60%% of free GPU memory on CUDA)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--no-prefix-cache", action="store_true", help="recompute every prompt from scratch")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def engine_from_args(args: argparse.Namespace):
    import torch

    from localchat.engine import Engine, EngineConfig, default_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = EngineConfig(
        block_size=args.block_size,
        kv_cache_gb=args.kv_cache_gb,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_cache=not args.no_prefix_cache,
    )
    return Engine.from_pretrained(args.model, dtype=args.dtype or default_dtype(device), device=device, config=config)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
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
    from localchat.sampling_params import SamplingParams

    values = {name: getattr(args, name) for name in SAMPLING_FLAGS}
    values["stop"] = tuple(args.stop)
    values["ignore_eos"] = args.ignore_eos
    values["early_stopping"] = {"true": True, "false": False, "never": "never"}[args.early_stopping]
    values.update(overrides or {})
    return SamplingParams.from_dict(values)


def _output_json(out, model_name: str) -> dict:
    return {
        "request_id": out.request_id,
        "model": model_name,
        "prompt_token_ids": out.prompt_token_ids,
        "outputs": [
            {
                "index": o.index,
                "text": o.text,
                "token_ids": o.token_ids,
                "finish_reason": o.finish_reason,
                "cumulative_logprob": o.cumulative_logprob,
                **({"logprobs": o.logprobs} if o.logprobs is not None else {}),
            }
            for o in out.outputs
        ],
        "metrics": {
            "prompt_tokens": out.metrics.num_prompt_tokens,
            "prefix_hit_tokens": out.metrics.prefix_hit_tokens,
            "generated_tokens": out.metrics.num_generated_tokens,
            "time_to_first_token_s": out.metrics.time_to_first_token,
        },
    }


def _request_from_line(line: str, lineno: int, args: argparse.Namespace) -> dict:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"--requests line {lineno}: not JSON ({exc})") from None
    if not isinstance(item, dict):
        raise SystemExit(f"--requests line {lineno}: expected a JSON object")
    request: dict = {}
    if "prompt" in item:
        request["prompt"] = item.pop("prompt")
    elif "messages" in item:
        request["messages"] = item.pop("messages")
    elif "prompt_token_ids" in item:
        request["prompt_token_ids"] = item.pop("prompt_token_ids")
    else:
        raise SystemExit(f"--requests line {lineno}: needs prompt, messages or prompt_token_ids")
    system = item.pop("system", args.system)
    if system and "prompt" in request:
        request = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": request["prompt"]}]}
    if "stop" in item and isinstance(item["stop"], str):
        item["stop"] = [item["stop"]]
    try:
        request["params"] = sampling_from_args(args, {k: tuple(v) if isinstance(v, list) else v for k, v in item.items()})
    except (ValueError, TypeError) as exc:
        raise SystemExit(f"--requests line {lineno}: {exc}") from None
    return request


def cmd_generate(args: argparse.Namespace) -> int:
    from localchat.engine import RequestError

    if args.requests is None and args.prompt is None:
        print("error: give a PROMPT or --requests FILE.jsonl", file=sys.stderr)
        return 2
    try:
        params = sampling_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    requests: list[dict] = []
    if args.requests is not None:
        path = Path(args.requests)
        if not path.exists():
            print(f"error: no such file: {path}", file=sys.stderr)
            return 2
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                requests.append(_request_from_line(line, lineno, args))
    else:
        if args.system:
            requests.append({"messages": [{"role": "system", "content": args.system}, {"role": "user", "content": args.prompt}], "params": params})
        else:
            requests.append({"prompt": args.prompt, "params": params})

    from localchat.models import ModelNotFoundError

    try:
        engine = engine_from_args(args)
    except (ModelNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        ids = [engine.add_request(**r) for r in requests]
    except (RequestError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    started = time.perf_counter()
    finals: dict = {}
    stream_text = not args.json and args.requests is None and params.n == 1 and not params.is_beam_search
    while engine.has_unfinished():
        for out in engine.step():
            if stream_text:
                sys.stdout.write(out.outputs[0].delta_text)
                sys.stdout.flush()
            if out.finished:
                finals[out.request_id] = out
                if args.requests is not None:
                    line = _output_json(out, engine.model_name) if args.json else {"request_id": out.request_id, "outputs": [o.text for o in out.outputs]}
                    print(json.dumps(line), flush=True)
    elapsed = time.perf_counter() - started
    memory = engine.memory()
    if args.requests is not None:
        generated = sum(f.metrics.num_generated_tokens for f in finals.values())
        print(json.dumps({
            "totals": {
                "requests": len(ids),
                "prompt_tokens": sum(len(f.prompt_token_ids) for f in finals.values()),
                "generated_tokens": generated,
                "seconds": elapsed,
                "generated_tokens_per_s": generated / elapsed if elapsed > 0 else 0.0,
                "steps": engine.steps,
            },
            "memory": memory,
        }), flush=True)
        return 0
    final = finals[ids[0]]
    if args.json:
        doc = _output_json(final, engine.model_name)
        doc["memory"] = memory
        if params.n > 1 or params.is_beam_search:
            doc["sharing"] = {
                "blocks_used_peak": memory["blocks_used_peak"],
                "blocks_unshared_peak": memory["blocks_unshared_at_used_peak"],
                "sharing_savings": memory["sharing_savings_peak"],
                "cow_copies": memory["cow_copies"],
            }
        doc["seconds"] = elapsed
        print(json.dumps(doc, indent=2))
    elif stream_text:
        print()
    else:
        for o in final.outputs:
            print(f"--- {o.index} ({o.finish_reason}, logprob {o.cumulative_logprob:.2f})")
            print(o.text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="localchat", description="Local LLM chat on a PagedAttention engine")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a reply (or many, from a JSONL file)")
    gen.add_argument("prompt", nargs="?", default=None)
    gen.add_argument("--system", default=None, help="system prompt")
    gen.add_argument("--requests", default=None, help="JSONL file: one request per line")
    gen.add_argument("--json", action="store_true", help="print JSON instead of streaming text")
    add_engine_args(gen)
    _add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    try:
        from localchat.chats_cli import add_chats_parser, run_chats

        add_chats_parser(sub)
        sub.choices["chats"].set_defaults(func=run_chats)
    except ImportError:  # pragma: no cover - the store is optional for the engine
        pass

    try:
        from localchat.bench import add_bench_parser

        add_bench_parser(sub)
    except ImportError:  # pragma: no cover
        pass
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
