"""`localchat serve` as a user runs it, on the real default model, through the official openai client:
a real answer, streaming with usage, n = 3 sharing the prompt's blocks, the prefix cache across
requests, logprobs, and the API key from the environment."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from helpers.api_server import free_port

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
KEY = "real-model-key"


@pytest.fixture(scope="module")
def served():
    port = free_port()
    env = {**os.environ, "LOCALCHAT_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "localchat", "serve", "--port", str(port), "--dtype", "float32",
                             "--kv-cache-gb", "0.25"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "localchat serve did not start"
            time.sleep(0.5)
        yield url, openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and not line.startswith("#")}


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_a_real_answer(served):
    url, oa = served
    model = oa.models.list().data[0].id
    r = oa.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=30)
    assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 30 and r.model_extra["timings"]["predicted_per_second"] > 0
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_streaming_n3_and_the_prefix_cache(served):
    url, oa = served
    model = oa.models.list().data[0].id
    system = ("You are a geography tutor. Answer in one short sentence, name the country's capital city, "
              "and do not add anything else. ") * 3
    messages = [{"role": "system", "content": system}] + QUESTION
    chunks = list(oa.chat.completions.create(model=model, messages=messages, temperature=0.3, seed=1, n=3, max_tokens=40,
                                             stream=True, stream_options={"include_usage": True}))
    texts = {i: "" for i in range(3)}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
    assert sum("Paris" in t for t in texts.values()) >= 2, texts  # a 135M model, sampled: most of them
    usage = chunks[-1].usage
    assert usage.prompt_tokens > 60 and 3 <= usage.completion_tokens <= 3 * 40
    # Another question after the same long system prompt: its blocks come from the prefix cache.
    again = oa.chat.completions.create(model=model, messages=[{"role": "system", "content": system},
                                                              {"role": "user", "content": "What is the capital of Italy?"}],
                                       temperature=0, max_tokens=20, logprobs=True, top_logprobs=2)
    assert "Rome" in again.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens >= 48
    entries = again.choices[0].logprobs.content
    assert entries and all(e.top_logprobs[0].token == e.token for e in entries)  # greedy picks the top one
    m = metrics(url)
    assert m["localchat:blocks_used"] == 0 and m["localchat:prefix_cache_hits_total"] >= 48
