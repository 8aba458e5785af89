"""`localchat generate`: one reply (streamed, or JSON with the memory figures), or many from a JSONL file."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from localchat.cli.common import add_engine_args, add_sampling_args, engine_from_args, error, sampling_from_args
from localchat.text import decode_utf8

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
        **({"error": out.error} if out.error is not None else {}),
    }


def _request_from_line(line: str, lineno: int, args: argparse.Namespace) -> dict:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--requests line {lineno}: not JSON ({exc})") from None
    if not isinstance(item, dict):
        raise ValueError(f"--requests line {lineno}: expected a JSON object")
    request: dict = {}
    if "prompt" in item:
        request["prompt"] = item.pop("prompt")
    elif "messages" in item:
        request["messages"] = item.pop("messages")
    elif "prompt_token_ids" in item:
        request["prompt_token_ids"] = item.pop("prompt_token_ids")
    else:
        raise ValueError(f"--requests line {lineno}: needs prompt, messages or prompt_token_ids")
    system = item.pop("system", args.system)
    if system and "prompt" in request:
        request = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": request["prompt"]}]}
    if "stop" in item and isinstance(item["stop"], str):
        item["stop"] = [item["stop"]]
    try:
        request["params"] = sampling_from_args(args, {k: tuple(v) if isinstance(v, list) else v for k, v in item.items()})
    except (ValueError, TypeError) as exc:
        raise ValueError(f"--requests line {lineno}: {exc}") from None
    request["line"] = lineno
    return request


def _requests(args: argparse.Namespace, params) -> list[dict]:
    """The requests the command line asks for (raises ValueError with a clear message)."""
    if args.requests is None:
        if args.system:
            return [{"messages": [{"role": "system", "content": args.system}, {"role": "user", "content": args.prompt}], "params": params}]
        if not args.prompt:  # refused before the model loads (seconds), as the engine would refuse it after
            raise ValueError("the prompt is empty: give a PROMPT with some text")
        return [{"prompt": args.prompt, "params": params}]
    path = Path(args.requests)
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    try:
        text = decode_utf8(path.read_bytes(), f"--requests {path}")  # TextError (a ValueError) names the bad byte
    except OSError as exc:
        raise ValueError(f"cannot read --requests {path}: {exc.strerror or exc}") from None
    requests = [_request_from_line(line, lineno, args) for lineno, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not requests:
        raise ValueError(f"--requests {path} holds no requests (one JSON object a line)")
    return requests


def cmd_generate(args: argparse.Namespace) -> int:
    from localchat.engine import RequestError

    if args.requests is None and args.prompt is None:
        return error("give a PROMPT or --requests FILE.jsonl")
    try:
        params = sampling_from_args(args)
        requests = _requests(args, params)
        engine = engine_from_args(args)  # unknown models and bad sizes are ValueErrors too
        ids = [_add(engine, r) for r in requests]
    except (RequestError, ValueError) as exc:
        return error(str(exc))
    stream_text = not args.json and args.requests is None and params.n == 1 and not params.is_beam_search
    started = time.perf_counter()
    finals = _run(engine, args, stream_text)
    elapsed = time.perf_counter() - started
    failed = [f for f in finals.values() if f.error is not None]
    for f in failed:  # the engine failed these requests alone (a fault in their step); the rest ran
        print(f"error: request {f.request_id}: {f.error}", file=sys.stderr)
    if failed and args.requests is None:
        return 1
    if args.requests is not None:
        _print_totals(engine, finals, len(ids), elapsed)
    elif args.json:
        _print_json(engine, finals[ids[0]], params, elapsed)
    elif stream_text:
        print()
    else:
        for o in finals[ids[0]].outputs:
            print(f"--- {o.index} ({o.finish_reason}, logprob {o.cumulative_logprob:.2f})")
            print(o.text)
    return 0


def _add(engine, request: dict) -> str:
    line = request.pop("line", None)
    try:
        return engine.add_request(**request)
    except ValueError as exc:  # RequestError too: say which line of --requests it came from
        raise ValueError(f"--requests line {line}: {exc}" if line is not None else str(exc)) from None


def _run(engine, args: argparse.Namespace, stream_text: bool) -> dict:
    """Step the engine until every request is done; stream text or print batch lines as they finish."""
    finals: dict = {}
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
    return finals


def _print_totals(engine, finals: dict, num_requests: int, elapsed: float) -> None:
    generated = sum(f.metrics.num_generated_tokens for f in finals.values())
    totals = {
        "requests": num_requests,
        "prompt_tokens": sum(len(f.prompt_token_ids) for f in finals.values()),
        "generated_tokens": generated,
        "seconds": elapsed,
        "generated_tokens_per_s": generated / elapsed if elapsed > 0 else 0.0,
        "steps": engine.steps,
    }
    totals["failed"] = sum(f.error is not None for f in finals.values())
    print(json.dumps({"totals": totals, "memory": engine.memory()}), flush=True)


def _print_json(engine, final, params, elapsed: float) -> None:
    memory = engine.memory()
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
    doc.update(engine.weights)  # which weights ran, and the bytes of weights a decode step streams
    print(json.dumps(doc, indent=2))


def add_generate_parser(sub) -> None:
    gen = sub.add_parser("generate", help="generate a reply (or many, from a JSONL file)")
    gen.add_argument("prompt", nargs="?", default=None)
    gen.add_argument("--system", default=None, help="system prompt")
    gen.add_argument("--requests", default=None, help="JSONL file: one request per line")
    gen.add_argument("--json", action="store_true", help="print JSON instead of streaming text")
    add_engine_args(gen)
    add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)
