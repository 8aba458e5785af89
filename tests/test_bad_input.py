"""A catalogue of bad input for the command line and the API: each input, the message it gets, and the
state afterwards unchanged (no database row written, no KV block used, no request left running), and
never a traceback. Text that is not what it should be (bytes that are not UTF-8, lone surrogates, NUL
and control characters) is either taken as text or refused with a message (localchat/text.py).
The page's catalogue is in tests/test_bad_input_page.py."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from localchat.cli import main
from localchat.text import decode_utf8, repair, text_problem

EXPORT = {"format": "localchat.conversation", "version": 1,
          "conversation": {"title": "t", "created_at": 1.0, "updated_at": 1.0},
          "messages": [{"id": 1, "parent": None, "role": "user", "content": "hi", "created_at": 1.0}]}


# ------------------------------------------------------------------ the one rule for text
def test_what_counts_as_text():
    for fine in ("", "plain", "nul \x00 inside", "\x1b[31mescape\x07", "\ufeff\ufffe\uffff\U0010ffff", "\u2028"):
        assert text_problem(fine) is None
    assert "lone surrogate (U+D800 at character 3)" in text_problem("ab\ud800")
    assert "must be a string" in text_problem(b"bytes")
    # Bytes a shell passed that are not UTF-8 (Python carries them as surrogates) decode as UTF-8 would.
    assert repair("a" + b"\xed\xa0\x80".decode("utf-8", "surrogateescape") + "b") == "a\ufffd\ufffd\ufffdb"
    assert repair("caf" + b"\xe9".decode("utf-8", "surrogateescape")) == "caf\ufffd"
    assert repair("lone \ud800 one") == "lone \ufffd\ufffd\ufffd one"
    assert repair("fine é") == "fine é"
    with pytest.raises(ValueError, match=r"not UTF-8 text \(byte 0xff at line 2, column 3\)"):
        decode_utf8(b"ok\nab\xffcd", "the file")
    assert decode_utf8("\ufeffbom".encode(), "x") == "bom"


# ------------------------------------------------------------------ the command line
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from helpers.tiny_app import save_tiny_model

    return str(save_tiny_model(tmp_path_factory.mktemp("model") / "tiny-model"))


def _files(tmp: Path) -> dict[str, Path]:
    files = {
        "binary": b"x\xff\xfe\x00binary",
        "not_json": b"this is not json\n",
        "array": b"[1, 2]\n",
        "surrogate": json.dumps({"prompt": "hi \ud800"}).encode(),
        "bad_value": json.dumps({"prompt": "hi", "temperature": -1}).encode(),
        "empty": b"\n\n",
        "long": json.dumps({"prompt": "word " * 3000}).encode(),
        "control": json.dumps({"prompt": "nul \x00 bell \x07 esc \x1b[1m"}).encode(),
        "import_binary": b"\x89PNG\r\n\x1a\n\x00\x00",
        "import_surrogate": json.dumps({**EXPORT, "messages": [{**EXPORT["messages"][0], "content": "\udc80"}]}).encode(),
        "import_title": json.dumps({**EXPORT, "conversation": {**EXPORT["conversation"], "title": "t\ud83d"}}).encode(),
        "import_format": json.dumps({"format": "something else"}).encode(),
        "import_control": json.dumps({**EXPORT, "messages": [{**EXPORT["messages"][0], "content": "a\x00b\x1b[2J"}]}).encode(),
    }
    out = {}
    for name, data in files.items():
        out[name] = tmp / f"{name}.jsonl"
        out[name].write_bytes(data)
    return out


ESCAPED = b"\xed\xa0\x80".decode("utf-8", "surrogateescape")  # what a shell hands Python for those bytes

# (arguments, exit code, what stderr says, what stdout holds); {model}, {file:NAME} and {db} are filled in.
CLI_CASES = [
    (["generate"], 2, "give a PROMPT or --requests FILE.jsonl", ""),
    (["generate", ""], 2, "the prompt is empty", ""),
    (["generate", "   \n\t"], 2, "the prompt is empty", ""),
    (["generate", "--requests", "{tmp}/missing.jsonl"], 2, "no such file", ""),
    (["generate", "--requests", "{file:binary}"], 2, "is not UTF-8 text (byte 0xff at line 1, column 2)", ""),
    (["generate", "--requests", "{file:not_json}"], 2, "--requests line 1: not JSON", ""),
    (["generate", "--requests", "{file:array}"], 2, "--requests line 1: expected a JSON object", ""),
    (["generate", "--requests", "{file:surrogate}"], 2, "--requests line 1: message 1 (user) is not valid Unicode text: "
                                                        "it holds a lone surrogate (U+D800 at character 4)", ""),
    (["generate", "--requests", "{file:bad_value}"], 2, "--requests line 1: invalid sampling parameter: temperature must be >= 0", ""),
    (["generate", "--requests", "{file:empty}"], 2, "holds no requests", ""),
    (["generate", "--requests", "{file:long}"], 2, "the prompt has", ""),
    (["generate", "hi", "--max-tokens", "0"], 2, "max_tokens must be a positive integer", ""),
    (["generate", "hi", "--n", "1000"], 2, "n must be", ""),
    (["generate", "hi", "--temperature", "nan"], 2, "temperature", ""),
    (["generate", "hi", "--kv-cache-gb", "-1"], 2, "kv_cache_gb must be > 0", ""),
    (["generate", "hi", "--kv-cache-gb", "100000"], 2, "the largest value that fits: --kv-cache-gb", ""),
    (["generate", "hi", "--max-num-batched-tokens", "1000000000"], 2, "the largest value that fits: --max-num-batched-tokens", ""),
    (["generate", "hi", "--max-num-seqs", "0"], 2, "max_num_seqs must be an integer >= 1", ""),
    (["generate", "hi", "--max-model-len", "100000"], 2, "the largest is 2048", ""),
    (["generate", "hi", "--max-model-len", "2000", "--kv-cache-gb", "0.0001"], 2, "the largest context that fits is", ""),
    (["generate", "hi", "--max-tokens", "1500", "--kv-cache-gb", "0.0002"], 2, "or less, or raise --kv-cache-gb", ""),
    (["generate", "hi", "--beam-width", "8", "--max-tokens", "100", "--kv-cache-gb", "0.0002"], 2, "use beam_width", ""),
    (["generate", "hi", "--model", "no-such-model"], 2, "unknown model 'no-such-model'", ""),
    # Accepted as text: bytes that are not UTF-8 in an argument, control characters in a file.
    (["generate", "a" + ESCAPED + "b", "--max-tokens", "3"], 0, "", "*"),
    (["generate", "hi", "--system", "sys" + ESCAPED, "--max-tokens", "3"], 0, "", "*"),
    (["generate", "--requests", "{file:control}", "--max-tokens", "3"], 0, "", "*"),
    (["generate", "hi", "--stop", ESCAPED, "--max-tokens", "3"], 0, "", "*"),
    (["chats", "list", "--db", "{db}", "--search", "x" + ESCAPED], 0, "", "no conversations"),
    (["chats", "import", "{file:import_binary}", "--db", "{db}"], 1, "not a localchat export: invalid JSON (the file is not UTF-8 text", ""),
    (["chats", "import", "{file:import_surrogate}", "--db", "{db}"], 1, "message #1: content is not valid Unicode text", ""),
    (["chats", "import", "{file:import_title}", "--db", "{db}"], 1, "conversation title is not valid Unicode text", ""),
    (["chats", "import", "{file:import_format}", "--db", "{db}"], 1, "not a localchat export", ""),
    (["chats", "import", "{tmp}/missing.json", "--db", "{db}"], 1, "no such file", ""),
    (["chats", "export", "999", "--db", "{db}"], 1, "999", ""),
    (["chats", "list", "--db", "{file:binary}"], 1, "not an SQLite database", ""),
    (["serve", "--api-key", "k" + ESCAPED], 2, "--api-key is not valid UTF-8 text", ""),
]


def _fill(arg: str, files: dict, tmp: Path, model: str) -> str:
    if arg.startswith("{file:"):
        return str(files[arg[6:-1]])
    return arg.replace("{tmp}", str(tmp)).replace("{db}", str(tmp / "chats.db")).replace("{model}", model)


def _db_state(tmp: Path) -> str | None:
    db = tmp / "chats.db"
    return hashlib.sha256(db.read_bytes()).hexdigest() if db.exists() else None


@pytest.mark.parametrize("case", CLI_CASES, ids=lambda c: " ".join(c[0])[:60].encode("ascii", "backslashreplace").decode())
def test_command_line_catalogue(case, tiny_model, tmp_path, capsys):
    args, code, message, stdout = case
    files = _files(tmp_path)
    from localchat.chat.store import Store

    Store(tmp_path / "chats.db").close()  # an existing database: it must come out unchanged
    before = _db_state(tmp_path)
    argv = [_fill(a, files, tmp_path, tiny_model) for a in args]
    if argv[0] in ("generate", "serve"):
        argv += ["--model", tiny_model] if "--model" not in argv else []
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == code, err
    assert message in err
    assert "Traceback" not in err
    if stdout == "*":
        assert out.strip()
    elif stdout:
        assert stdout in out
    assert _db_state(tmp_path) == before  # nothing written (a refused import, a list, a search)


def test_a_good_import_of_control_characters_is_kept_as_text(tmp_path, capsys):
    files = _files(tmp_path)
    assert main(["chats", "import", str(files["import_control"]), "--db", str(tmp_path / "c.db")]) == 0
    from localchat.chat.store import Store

    with Store(tmp_path / "c.db") as store:
        assert store.list_messages(1)[0].content == "a\x00b\x1b[2J"


def test_a_shell_passes_bytes_that_are_not_utf8(tiny_model):
    """The issue's case, as a shell runs it: a prompt holding the bytes ED A0 80 (a UTF-8-encoded surrogate)."""
    proc = subprocess.run([sys.executable.encode(), b"-m", b"localchat", b"generate", b"a\xed\xa0\x80b", b"--model",
                           tiny_model.encode(), b"--max-tokens", b"3"], capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert b"Traceback" not in proc.stderr and proc.stdout.strip()


# ------------------------------------------------------------------ the API
@pytest.fixture(scope="module")
def api(smol_tokenizer):
    from fastapi.testclient import TestClient

    from helpers.tiny import tiny_engine
    from localchat.api.server import create_app
    from localchat.engine import EngineDriver

    driver = EngineDriver(tiny_engine(smol_tokenizer, num_blocks=48, block_size=8))  # 384 tokens; context 512
    app = create_app(driver)
    with TestClient(app) as client:
        yield client, driver
    app.state.api.close()
    driver.shutdown()


def _chat(content="hi", **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **extra}


def _engine_state(engine) -> tuple:
    return engine.block_manager.figures().blocks_used, len(engine.requests)


# (method, path, body: dict, or bytes sent as they are, status, error code, what the message says)
API_CASES = [
    ("POST", "/v1/chat/completions", b"", 400, "invalid_json", "The request body is empty"),
    ("POST", "/v1/chat/completions", b"{not json", 400, "invalid_json", "could not parse the JSON"),
    ("POST", "/v1/chat/completions", b"\xff\xfe{}", 400, "invalid_json", "could not parse the JSON"),
    ("POST", "/v1/chat/completions", b"[1, 2]", 400, None, "JSON object"),
    ("POST", "/v1/chat/completions", {"model": "tiny"}, 400, None, "messages"),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": "hi"}, 400, None, "messages"),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": []}, 400, None, "messages"),
    ("POST", "/v1/chat/completions", _chat("bad \ud800 text"), 400, None, "is not valid Unicode text: it holds a lone surrogate"),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400, None, "role"),
    ("POST", "/v1/chat/completions", {**_chat(), "model": "gpt-9"}, 404, "model_not_found", "gpt-9"),
    ("POST", "/v1/chat/completions", _chat(n=0), 400, None, "n"),
    ("POST", "/v1/chat/completions", _chat(n=1000), 400, None, "n"),
    ("POST", "/v1/chat/completions", _chat(max_tokens=-1), 400, None, "max_tokens"),
    ("POST", "/v1/chat/completions", _chat(max_tokens="many"), 400, None, "max_tokens"),
    ("POST", "/v1/chat/completions", _chat(max_tokens=10**9), 400, "context_length_exceeded", "maximum context length is 384"),
    ("POST", "/v1/chat/completions", _chat(temperature="hot"), 400, None, "temperature"),
    ("POST", "/v1/chat/completions", _chat(temperature=-1), 400, None, "temperature"),
    ("POST", "/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
     400, None, "temperature"),
    ("POST", "/v1/chat/completions", _chat(top_p=2), 400, None, "top_p"),
    ("POST", "/v1/chat/completions", _chat(stop=["s"] * 100), 400, None, "stop"),
    ("POST", "/v1/chat/completions", _chat(frobnicate=True), 400, "unknown_parameter", "frobnicate"),
    ("POST", "/v1/chat/completions", _chat(tools=[{"type": "function"}]), 400, "unsupported_parameter", "tools"),
    ("POST", "/v1/chat/completions", _chat("word " * 600), 400, "context_length_exceeded", "maximum context length"),
    ("POST", "/v1/chat/completions", _chat(seed="x"), 400, None, "seed"),
    ("POST", "/v1/completions", {"model": "tiny", "prompt": ""}, 400, None, "empty"),
    ("POST", "/v1/completions", {"model": "tiny", "prompt": [10**9]}, 400, None, "prompt"),
    ("POST", "/v1/completions", {"model": "tiny", "prompt": "x \udfff"}, 400, None, "lone surrogate"),
    ("POST", "/v1/completions", {"model": "tiny", "prompt": "hi", "logprobs": 99}, 400, None, "logprobs"),
    ("GET", "/v1/chat/completions", None, 405, None, ""),
]


@pytest.mark.parametrize("case", API_CASES, ids=lambda c: f"{c[1]} {str(c[2])[:50]}".encode("ascii", "backslashreplace").decode())
def test_api_catalogue(case, api):
    client, driver = api
    method, path, body, status, code, message = case
    before = driver.call(_engine_state)
    if isinstance(body, bytes):
        response = client.request(method, path, content=body, headers={"content-type": "application/json"})
    elif body is None:
        response = client.request(method, path)
    else:
        raw = json.dumps(body).encode()  # json.dumps escapes a lone surrogate as \\udXXX, as a client would send it
        response = client.request(method, path, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    if status != 405:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert message in error["message"], error
        if code:
            assert error["code"] == code
    assert driver.call(_engine_state) == before == (0, 0)  # nothing running, no block held


def test_api_takes_control_characters_as_text(api):
    client, driver = api
    response = client.post("/v1/chat/completions", json=_chat("nul \x00 bell \x07 esc \x1b[1m", max_tokens=3))
    assert response.status_code == 200, response.text
    assert driver.call(_engine_state) == (0, 0)
