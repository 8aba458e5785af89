"""A terminal chat on the engine: streaming replies, multi-turn prefix-cache reuse."""

from __future__ import annotations

import sys

from localchat.chat_format import continuation_ids
from localchat.engine import Engine, RequestError
from localchat.sampling_params import SamplingParams


def run_terminal_chat(engine: Engine, *, system: str | None, max_tokens: int, temperature: float, stdin=None, stdout=None) -> int:
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    ids: list[int] | None = None
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=0.95)
    stdout.write(f"localchat on {engine.model_name} ({engine.dtype}, {engine.block_manager.num_blocks} KV blocks). Empty line or Ctrl-D quits.\n")
    while True:
        stdout.write("\nyou> ")
        stdout.flush()
        line = stdin.readline()
        if not line or not line.strip():
            return 0
        user = {"role": "user", "content": line.rstrip("\n")}
        try:
            if ids is None:
                prompt_ids = engine.tokenize_messages(messages + [user])
            else:
                prompt_ids = ids + continuation_ids(engine.tokenizer, messages, reply_ids, [user])
            request_id = engine.add_request(prompt_token_ids=prompt_ids, params=params)
        except (RequestError, ValueError) as exc:
            stdout.write(f"error: {exc}\n")
            continue
        stdout.write("bot> ")
        final = None
        while final is None:
            for out in engine.step():
                if out.request_id == request_id:
                    stdout.write(out.outputs[0].delta_text)
                    stdout.flush()
                    if out.finished:
                        final = out
        reply = final.outputs[0]
        m = final.metrics
        stdout.write(
            f"\n[{len(reply.token_ids)} tokens, {reply.finish_reason}; prompt {m.num_prompt_tokens} tokens, "
            f"{m.prefix_hit_tokens} from cache; first token {m.time_to_first_token or 0:.2f}s]\n"
        )
        messages += [user, {"role": "assistant", "content": reply.text}]
        reply_ids = list(reply.token_ids)
        ids = prompt_ids + reply_ids
