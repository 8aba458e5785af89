"""The one way text becomes prompt token ids: the model's chat template, then its tokenizer.

The engine (a request given as messages), the chat service (a conversation's turns) and the bench
all come here. The next turn's prompt is the previous prompt's ids + the reply's ids exactly as
generated + the template's tokens for the new message (`continuation_ids`), so the history matches
the prefix cache block for block and only the new tokens are prefilled.
"""

from __future__ import annotations

from localchat.text import check_text

ROLES = ("system", "user", "assistant")


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of text that already holds the template's special tokens (none are added)."""
    check_text(text, "the text")  # a lone surrogate would end in the tokenizer's TypeError
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_messages(messages: list[dict]) -> None:
    """Raise ValueError with a readable message for a conversation the template cannot render."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"each message needs a role (system, user or assistant) and text content, got {m!r}"[:300])
        check_text(m["content"], f"message {i + 1} ({m['role']})")
    if not any(m["content"].strip() for m in messages if m["role"] == "user"):
        raise ValueError("the prompt is empty: write a message first")


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The conversation in the model's chat template with the assistant's turn opened."""
    check_messages(messages)
    return encode(tokenizer, render(tokenizer, messages, add_generation_prompt=True))


def continuation_ids(tokenizer, history: list[dict], reply_ids: list[int], new_messages: list[dict]) -> list[int]:
    """Token ids to append after `reply_ids` (the last assistant turn's generated ids, ending
    with the end-of-turn token when it stopped on its own) to add `new_messages` and open the
    assistant's next turn.

    `history` is the conversation as messages, ending with that assistant reply's text.
    """
    if not history or history[-1].get("role") != "assistant":
        raise ValueError("history must end with the assistant reply whose ids are given")
    closed = render(tokenizer, history, add_generation_prompt=False)
    full = render(tokenizer, history + new_messages, add_generation_prompt=True)
    if not full.startswith(closed):
        raise ValueError("the chat template does not render the history as a prefix of the next turn")
    reply_text = history[-1]["content"]
    end = closed.rfind(reply_text) + len(reply_text) if reply_text else None
    if end is None or end < len(reply_text):
        raise ValueError("the assistant reply is not in the rendered history")
    # What the template puts after the reply's text (e.g. "<|im_end|>\n"), minus what the
    # model already generated itself (the end-of-turn token).
    closing = closed[end:]
    eos_text = tokenizer.decode(reply_ids[-1:]) if reply_ids else ""
    if eos_text and closing.startswith(eos_text) and reply_ids[-1] in set(tokenizer.all_special_ids):
        closing = closing[len(eos_text) :]
    return encode(tokenizer, closing + full[len(closed) :])
