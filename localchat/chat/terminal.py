"""A terminal chat: streaming replies, saved as a conversation, each turn re-using the cache."""

from __future__ import annotations

import sys

from localchat.chat.service import ChatService
from localchat.engine import RequestError, SamplingParams


def run_terminal_chat(service: ChatService, *, system: str | None, params: SamplingParams, stdin=None, stdout=None) -> int:
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    info = service.info
    conversation = service.new_conversation("Terminal chat", system_prompt=system)
    stdout.write(
        f"localchat on {info.model_name} ({info.dtype}, {info.num_blocks} KV blocks), "
        f"conversation {conversation.id} in {service.store.db_path}. Empty line or Ctrl-D quits.\n"
    )
    while True:
        stdout.write("\nyou> ")
        stdout.flush()
        line = stdin.readline()
        if not line or not line.strip():
            return 0
        stdout.write("bot> ")
        try:
            for events in service.send(conversation.id, line.rstrip("\n"), params):
                event = events[0]
                stdout.write(event.delta_text)
                stdout.flush()
        except (RequestError, ValueError) as exc:
            stdout.write(f"\nerror: {exc}\n")
            continue
        stdout.write(
            f"\n[{event.generated_tokens} tokens, {event.finish_reason}; prompt {event.prompt_tokens} tokens, "
            f"{event.prefix_hit_tokens} from cache; first token {event.ttft_s or 0:.2f}s]\n"
        )
