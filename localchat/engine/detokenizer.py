"""Incremental detokenization and stop strings.

Decoding the whole output at every step costs O(n^2) over a reply. Instead each step decodes a
short window that starts a few tokens back (so merges across token boundaries and leading spaces
come out right) and emits only what the window adds; text that ends in an incomplete UTF-8
character waits for the next token.
"""

from __future__ import annotations

from localchat.engine.sequence import Sequence

# How many already-emitted tokens the window keeps for context.
_CONTEXT_TOKENS = 5


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def detokenize_step(tokenizer, seq: Sequence) -> None:
    """Extend `seq.text` with the text of newly generated tokens."""
    out = seq.output_token_ids
    if seq.read_offset >= len(out):
        return
    prefix = _decode(tokenizer, out[seq.prefix_offset : seq.read_offset])
    full = _decode(tokenizer, out[seq.prefix_offset :])
    if len(full) > len(prefix) and not full.endswith("\ufffd"):
        seq.text += full[len(prefix) :]
        seq.read_offset = len(out)
        seq.prefix_offset = max(0, seq.read_offset - _CONTEXT_TOKENS)


def flush(tokenizer, seq: Sequence) -> None:
    """At the end of a sequence, emit whatever the window still holds back."""
    out = seq.output_token_ids
    if seq.read_offset < len(out):
        prefix = _decode(tokenizer, out[seq.prefix_offset : seq.read_offset])
        full = _decode(tokenizer, out[seq.prefix_offset :])
        if len(full) > len(prefix):
            seq.text += full[len(prefix) :].rstrip("\ufffd")
        seq.read_offset = len(out)


def find_stop(text: str, stops: tuple[str, ...], new_chars: int) -> int | None:
    """Index where the earliest stop string starts, looking only where new text could complete one."""
    if not stops:
        return None
    best: int | None = None
    for stop in stops:
        start = max(0, len(text) - new_chars - len(stop) + 1)
        at = text.find(stop, start)
        if at != -1 and (best is None or at < best):
            best = at
    return best


def safe_emit_length(text: str, stops: tuple[str, ...]) -> int:
    """How much of `text` can be shown: a tail that might be the start of a stop string waits."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return len(text) - hold
