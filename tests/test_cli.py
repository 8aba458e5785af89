"""`python -m localchat generate` on the real default model, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "localchat", *args], capture_output=True, text=True, timeout=timeout)


def test_generate_streams_text():
    proc = run_cli("generate", "What is the capital of France?", "--temperature", "0", "--max-tokens", "24", "--dtype", "float32", "--kv-cache-gb", "0.1")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_generate_json_reports_ids_and_memory():
    proc = run_cli("generate", "Say hello.", "--system", "You are terse.", "--temperature", "0", "--max-tokens", "16",
                   "--block-size", "8", "--json", "--kv-cache-gb", "0.1", "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["model"] == "smollm2-135m-instruct"
    assert doc["prompt_token_ids"] and all(isinstance(t, int) for t in doc["prompt_token_ids"])
    out = doc["outputs"][0]
    assert out["finish_reason"] in ("stop", "length") and out["token_ids"] and out["text"]
    mem = doc["memory"]
    for key in ("blocks_total", "blocks_used", "blocks_cached", "blocks_free", "kv_utilization", "sharing_savings",
                "cow_copies", "preemptions", "prefix_hit_tokens", "blocks_used_peak", "kv_utilization_peak"):
        assert key in mem, key
    assert mem["block_size"] == 8
    assert mem["blocks_used"] == 0 and mem["blocks_used_peak"] >= -(-(len(doc["prompt_token_ids"]) + 1) // 8)
    assert mem["blocks_used"] + mem["blocks_cached"] + mem["blocks_free"] == mem["blocks_total"]


def test_generate_requests_file_runs_a_batch(tmp_path):
    lines = [
        {"prompt": "Count from one to five."},
        {"messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 6},
        {"prompt": "Name a color.", "temperature": 0.8, "seed": 3, "n": 2},
    ]
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    proc = run_cli("generate", "--requests", str(path), "--json", "--max-tokens", "12", "--temperature", "0", "--kv-cache-gb", "0.1", "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert len(rows) == 4
    per_request, totals = rows[:3], rows[3]
    assert sorted(len(r["outputs"]) for r in per_request) == [1, 1, 2]
    assert all(len(o["token_ids"]) <= 12 for r in per_request for o in r["outputs"])
    short = [r for r in per_request if r["outputs"][0]["token_ids"] and len(r["outputs"][0]["token_ids"]) <= 6]
    assert short
    t = totals["totals"]
    assert t["requests"] == 3
    assert t["generated_tokens"] == sum(len(o["token_ids"]) for r in per_request for o in r["outputs"])
    assert t["generated_tokens_per_s"] > 0 and t["seconds"] > 0
    assert totals["memory"]["blocks_used"] == 0 and "blocks_used_peak" in totals["memory"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", ""], "empty"),
        (["generate", "hi", "--max-tokens", "0"], "max_tokens"),
        (["generate", "hi", "--temperature", "-1"], "temperature"),
        (["generate", "hi", "--top-p", "1.5"], "top_p"),
        (["generate", "hi", "--model", "no-such-model"], "no-such-model"),
        (["generate", "hi " * 9000, "--kv-cache-gb", "0.5"], "context"),
        (["generate", "--requests", "/nonexistent.jsonl"], "no such file"),
    ],
)
def test_generate_bad_input_is_a_clear_error(args, message):
    proc = run_cli(*args, "--dtype", "float32")
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_app_terminal_chat_saves_the_conversation(tmp_path):
    db = tmp_path / "chats.db"
    proc = subprocess.run(
        [sys.executable, "app.py", "--terminal", "--db", str(db), "--temperature", "0", "--max-tokens", "24", "--kv-cache-gb", "0.1"],
        input="What is the capital of France?\nAnd of Italy?\n\n", capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout and "Rome" in proc.stdout
    listing = run_cli("chats", "--db", str(db), "export", "1", "--format", "md")
    assert listing.returncode == 0, listing.stderr
    assert "Paris" in listing.stdout and "And of Italy?" in listing.stdout
