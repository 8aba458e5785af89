"""What counts as text, wherever it comes from: command-line arguments, files, the page, the API, imports.

One rule for every layer, in a module every layer may import (like localchat/settings.py, it imports
nothing of ours): the store's checks (localchat/chat/store/rows.py) and the chat template
(localchat/model/chat_template.py) both ask `text_problem`. Text is any sequence of Unicode scalar
values. NUL, control characters and noncharacters are text like any other (SQLite stores them, the
tokenizer encodes them, the page escapes them); what is not text is a lone surrogate, which has no
UTF-8 form, so neither SQLite nor the tokenizer can take it. Bytes must be UTF-8.

Where the input is bytes that Python carried as surrogates (a command-line argument or file name
that is not UTF-8: PEP 383's surrogateescape), `repair` decodes them as a UTF-8 decoder would,
with U+FFFD for what is not UTF-8; elsewhere a lone surrogate is refused with a message saying where.
"""

from __future__ import annotations

import re

_SURROGATE = re.compile("[\ud800-\udfff]")


class TextError(ValueError):
    """A value that is not text (or bytes that are not UTF-8); the message says where."""


def text_problem(value: object) -> str | None:
    """Why `value` is not acceptable text, or None when it is."""
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    found = _SURROGATE.search(value)
    if found is not None:
        return (f"is not valid Unicode text: it holds a lone surrogate (U+{ord(found.group()):04X} at "
                f"character {found.start() + 1}), which has no UTF-8 form")
    return None


def check_text(value: object, what: str) -> str:
    """`value` if it is text; else TextError naming `what`."""
    problem = text_problem(value)
    if problem is not None:
        raise TextError(f"{what} {problem}")
    return value  # type: ignore[return-value]


def repair(value: str) -> str:
    """`value` with lone surrogates replaced: bytes carried by surrogateescape decoded as UTF-8 (U+FFFD for
    what is not UTF-8), any other lone surrogate as U+FFFD. Text that is already valid comes back as is."""
    if _SURROGATE.search(value) is None:
        return value
    raw = value.encode("utf-8", "surrogateescape") if _escaped_only(value) else value.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "replace")


def _escaped_only(value: str) -> bool:
    return all(0xDC80 <= ord(c) <= 0xDCFF for c in _SURROGATE.findall(value))


def decode_utf8(data: bytes, what: str) -> str:
    """Bytes as text (a UTF-8 byte order mark is dropped); TextError naming the line and column of
    the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        start = exc.start
        line = data.count(b"\n", 0, start) + 1
        column = start - (data.rfind(b"\n", 0, start) + 1) + 1
        raise TextError(f"{what} is not UTF-8 text (byte 0x{data[start]:02x} at line {line}, column {column}); "
                        "save it as UTF-8") from None
