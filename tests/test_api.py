"""The OpenAI-compatible API (localchat/api/) through the official `openai` client, against a server
started here on 127.0.0.1 over a tiny random-weight engine in its own process (as `localchat serve`
runs it): completions, streaming with usage, n samples sharing blocks, prefix-cache hits, logprobs,
penalties, every error case, the API key, and clients that go away mid-reply."""

from __future__ import annotations

import re
import time
import uuid

import httpx
import pytest
import torch

from helpers.api_server import ServerThread
from helpers.tiny import tiny_engine
from localchat.api.server import create_app
from localchat.engine import EngineDriver, EngineProcess, SamplingParams
from localchat.model import chat_template

openai = pytest.importorskip("openai")

BLOCK = 8
SEED = 3
KEY = "test-key-" + uuid.uuid4().hex


def blocks_used(engine) -> int:
    return engine.block_manager.figures().blocks_used


def check_invariants(engine) -> None:
    engine.block_manager.check_invariants()


@pytest.fixture(scope="module")
def engine_client():
    client = EngineProcess(tiny_engine, seed=SEED, num_blocks=256, block_size=BLOCK)
    yield client
    client.shutdown()


@pytest.fixture(scope="module")
def server(engine_client):
    app = create_app(engine_client)
    with ServerThread(app) as srv:
        yield srv
    app.state.api.close()


@pytest.fixture(scope="module")
def oa(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def local(smol_tokenizer):
    """The same tiny engine in this process: the reference for what the server must answer."""
    driver = EngineDriver(tiny_engine(smol_tokenizer, seed=SEED, num_blocks=256, block_size=BLOCK))
    yield driver
    driver.shutdown()


def metrics(url: str, headers: dict | None = None) -> dict[str, float]:
    """The /metrics page as {name{labels}: value}."""
    text = httpx.get(url + "/metrics", headers=headers or {}).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_idle(url: str, timeout: float = 60) -> dict[str, float]:
    """Poll /metrics until no request runs and no block is used (an abort lands between steps)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        idle = m["localchat:blocks_used"] == 0 and m["localchat:num_requests_running"] == 0 and m["localchat:num_requests_waiting"] == 0
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


MESSAGES = [{"role": "user", "content": "Tell me about owls."}]


# ------------------------------------------------------------------ plain requests
def test_models_and_health(server, oa, engine_client):
    models = oa.models.list().data
    assert [m.id for m in models] == ["tiny"] and models[0].max_model_len == engine_client.info.max_model_len
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert oa.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        oa.models.retrieve("gpt-4")


def test_chat_completion_is_the_engines_reply(oa, local, smol_tokenizer):
    r = oa.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=12, extra_body={"ignore_eos": True})
    expected = local.submit(messages=MESSAGES, params=SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)).result()
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "tiny"
    assert len(r.choices) == 1 and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected.outputs[0].text and r.choices[0].finish_reason == "length"
    prompt = chat_template.prompt_ids(smol_tokenizer, MESSAGES)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(prompt), 12, len(prompt) + 12)
    timings = r.model_extra["timings"]
    assert timings["predicted_n"] == 12 and timings["prompt_n"] + timings["cache_n"] == len(prompt)
    assert timings["prompt_ms"] > 0 and timings["predicted_per_second"] > 0


def test_completions_endpoint(oa, local, smol_tokenizer):
    r = oa.completions.create(model="tiny", prompt="Once upon a time", temperature=0, extra_body={"ignore_eos": True})
    ids = chat_template.encode(smol_tokenizer, "Once upon a time")
    expected = local.submit(prompt_token_ids=ids, params=SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)).result()
    assert r.object == "text_completion" and r.choices[0].text == expected.outputs[0].text
    assert r.usage.completion_tokens == 16  # OpenAI's default max_tokens for this endpoint
    by_ids = oa.completions.create(model="tiny", prompt=ids, temperature=0, max_tokens=16, extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == r.choices[0].text


def test_streaming_with_usage_equals_the_whole_reply(oa):
    kwargs = dict(model="tiny", messages=MESSAGES, temperature=0, max_tokens=20, extra_body={"ignore_eos": True})
    whole = oa.chat.completions.create(**kwargs)
    chunks = list(oa.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == ["length"]
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 20 and last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert last.model_extra["timings"]["predicted_n"] == 20


def test_streamed_completions_without_usage_carry_timings(oa):
    chunks = list(oa.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0, stream=True,
                                        extra_body={"ignore_eos": True}))
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].model_extra["timings"]["predicted_n"] == 6


def test_n_samples_share_the_prompts_blocks(server, oa):
    """n = 3: three choices forked after one prefill; /metrics shows the prompt's blocks shared."""
    system = "You are a helpful assistant who answers questions about birds in great detail. " * 4
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Three facts about owls?"}]
    stream = oa.chat.completions.create(model="tiny", messages=messages, n=3, temperature=1.0, seed=11, max_tokens=150,
                                        stream=True, extra_body={"ignore_eos": True})
    seen: set[int] = set()
    texts = {0: "", 1: "", 2: ""}
    during = None
    for chunk in stream:
        for choice in chunk.choices:
            seen.add(choice.index)
            texts[choice.index] += choice.delta.content or ""
        if during is None and len(seen) == 3:
            during = metrics(server.url)  # all three samples live
    assert seen == {0, 1, 2} and during is not None
    assert during["localchat:num_sequences"] == 3
    used, savings = during["localchat:blocks_used"], during["localchat:sharing_savings"]
    # ~80 prompt tokens in full blocks of 8 are held once, not three times.
    assert savings > 0.5 and used < 3 * 10, during
    assert len(set(texts.values())) == 3  # three different samples
    assert wait_idle(server.url)["localchat:blocks_used"] == 0


def test_same_long_prefix_is_served_from_the_cache(oa, smol_tokenizer):
    system = f"Conversation {uuid.uuid4().hex}: you are a careful assistant. " + "Answer briefly and precisely. " * 12
    first_msgs = [{"role": "system", "content": system}, {"role": "user", "content": "What is an owl?"}]
    second_msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Where do hawks live?"}]
    first = oa.chat.completions.create(model="tiny", messages=first_msgs, max_tokens=4, temperature=0)
    second = oa.chat.completions.create(model="tiny", messages=second_msgs, max_tokens=4, temperature=0)
    a = chat_template.prompt_ids(smol_tokenizer, first_msgs)
    b = chat_template.prompt_ids(smol_tokenizer, second_msgs)
    common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert common > 4 * BLOCK
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert len(a) >= (common // BLOCK + 1) * BLOCK  # the first prompt filled the block where they part
    # every full block of the shared prefix, and the shared tokens of the block where they part
    assert cached == common
    assert first.usage.prompt_tokens_details.cached_tokens < cached
    assert second.model_extra["timings"]["cache_n"] == cached


def test_logprobs_are_the_models(oa, local, smol_tokenizer):
    r = oa.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=4, logprobs=True, top_logprobs=3,
                                   extra_body={"ignore_eos": True})
    entries = r.choices[0].logprobs.content
    assert len(entries) == 4
    # The reference: transformers' forward on the same weights over prompt + reply.
    engine = local.engine
    prompt = chat_template.prompt_ids(smol_tokenizer, MESSAGES)
    reply = local.submit(prompt_token_ids=prompt, params=SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)).result()
    ids = reply.outputs[0].token_ids
    with torch.no_grad():
        logits = engine.hf_model(torch.tensor([prompt + ids])).logits[0].float()
    logprobs = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) + 3], dim=-1)
    for i, entry in enumerate(entries):
        text = smol_tokenizer.decode([ids[i]])
        assert entry.token == text and entry.bytes == list(text.encode())
        assert entry.logprob == pytest.approx(logprobs[i, ids[i]].item(), abs=2e-3)
        top = torch.topk(logprobs[i], 3)
        assert [t.token for t in entry.top_logprobs] == [smol_tokenizer.decode([t]) for t in top.indices.tolist()]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=2e-3)
    plain = oa.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_legacy_completions_logprobs(oa):
    r = oa.completions.create(model="tiny", prompt="The owl", max_tokens=5, temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    assert all(lp.token_logprobs[i] == pytest.approx(max(lp.top_logprobs[i].values())) for i in range(5))  # greedy


def test_stream_logprobs_arrive_with_their_tokens(oa):
    chunks = list(oa.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=6, logprobs=True,
                                             stream=True, extra_body={"ignore_eos": True}))
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(entries) == 6 and all(e.top_logprobs == [] for e in entries)


def test_seed_stop_and_penalties(oa):
    sampled = dict(model="tiny", messages=MESSAGES, temperature=1.0, max_tokens=12, extra_body={"ignore_eos": True})
    a = oa.chat.completions.create(**sampled, seed=42).choices[0].message.content
    b = oa.chat.completions.create(**sampled, seed=42).choices[0].message.content
    c = oa.chat.completions.create(**sampled, seed=43).choices[0].message.content
    assert a == b and a != c
    greedy = dict(model="tiny", messages=MESSAGES, temperature=0, max_tokens=30, extra_body={"ignore_eos": True})
    full = oa.chat.completions.create(**greedy).choices[0].message.content
    words = re.findall(r"\w{3,}", full)
    stop = words[len(words) // 2]
    cut = oa.chat.completions.create(**greedy, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == full[: full.index(stop)]
    # The tiny model's logits are nearly flat and it never repeats itself; a negative frequency
    # penalty raises every token already generated, so the first one wins every step after.
    def tokens(**extra):
        r = oa.chat.completions.create(**greedy, logprobs=True, **extra)
        return [e.token for e in r.choices[0].logprobs.content]

    assert len(set(tokens())) > 10
    repeated = tokens(frequency_penalty=-2.0)
    assert len(repeated) == 30 and set(repeated) == {repeated[0]}
    assert len(set(tokens(presence_penalty=-2.0))) < 30


# ------------------------------------------------------------------ errors
LONG = "owl " * 600  # beyond the tiny model's 512-token context


@pytest.mark.parametrize("kwargs, status, param, code", [
    ({"model": "gpt-4o"}, 404, "model", "model_not_found"),
    ({"messages": [{"role": "user", "content": LONG}]}, 400, "messages", "context_length_exceeded"),
    ({"max_tokens": 500}, 400, "messages", "context_length_exceeded"),
    ({"temperature": 3}, 400, "temperature", "invalid_value"),
    ({"top_p": 0}, 400, "top_p", "invalid_value"),
    ({"presence_penalty": -3}, 400, "presence_penalty", "invalid_value"),
    ({"n": 65}, 400, "n", "invalid_value"),
    ({"n": 0}, 400, "n", "invalid_value"),
    ({"max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ({"top_logprobs": 3}, 400, "top_logprobs", "invalid_value"),
    ({"logprobs": True, "top_logprobs": 30}, 400, "top_logprobs", "invalid_value"),
    ({"stop": ["a"] * 20}, 400, "stop", "invalid_value"),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options", "invalid_value"),
    ({"messages": []}, 400, "messages", "invalid_value"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role", "invalid_value"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages[0].content", "unsupported_parameter"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", "unsupported_parameter"),
    ({"logit_bias": {"50": 5}}, 400, "logit_bias", "unsupported_parameter"),
    ({"extra_body": {"beam_width": 4}}, 400, "beam_width", "unknown_parameter"),
])
def test_errors_have_openais_shape(oa, engine_client, kwargs, status, param, code):
    request = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.APIStatusError) as caught:
        oa.chat.completions.create(**request)
    err = caught.value
    assert err.status_code == status
    body = err.body if "message" in (err.body or {}) else (err.body or {}).get("error", {})
    assert body["param"] == param and body["code"] == code and body["message"]
    assert body["type"] == "invalid_request_error"
    assert engine_client.call(blocks_used) == 0


def test_the_neutral_values_of_unsupported_fields_pass(oa):
    r = oa.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, tools=[], logit_bias={}, user="me",
                                   response_format={"type": "text"}, parallel_tool_calls=True)
    assert r.choices[0].message.content is not None


@pytest.mark.parametrize("body", [b"{not json", b"", b"[1, 2]", b'"text"', "{\"model\": \"tiny\"}".encode()[:-1]])
def test_bad_json_is_a_400(server, body):
    r = httpx.post(server.url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == "invalid_json"


def test_completions_errors(server, oa):
    with pytest.raises(openai.BadRequestError, match="echo"):
        oa.completions.create(model="tiny", prompt="x", echo=True)
    with pytest.raises(openai.BadRequestError, match="one prompt per request"):
        oa.completions.create(model="tiny", prompt=["a", "b"])
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        oa.completions.create(model="tiny", prompt="x", logprobs=6)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        oa.completions.create(model="tiny", prompt=LONG)
    with pytest.raises(openai.BadRequestError, match="token ids"):
        oa.completions.create(model="tiny", prompt=[10**9])


# ------------------------------------------------------------------ the API key
def test_api_key_is_required_when_set(engine_client):
    app = create_app(engine_client, api_key=KEY)
    try:
        with ServerThread(app) as srv:
            wrong = openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0)
            with pytest.raises(openai.AuthenticationError) as caught:
                wrong.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
            assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"
            assert httpx.get(srv.url + "/v1/models").status_code == 401
            assert httpx.get(srv.url + "/metrics").status_code == 401
            assert httpx.get(srv.url + "/health").status_code == 200  # for load balancers
            right = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
            assert right.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).usage.completion_tokens >= 1
            assert metrics(srv.url, {"Authorization": f"Bearer {KEY}"})["localchat:engine_up"] == 1
    finally:
        app.state.api.close()


# ------------------------------------------------------------------ clients that go away
def test_a_client_that_disconnects_mid_stream_aborts_its_request(server, engine_client):
    before = metrics(server.url).get('localchat:request_success_total{finished_reason="abort"}', 0)
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 400, "n": 2, "temperature": 1, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        events = [next(lines) for _ in range(6)]
        assert any(e.startswith("data: {") for e in events)
        live = metrics(server.url)
        assert live["localchat:num_requests_running"] == 1 and live["localchat:blocks_used"] > 0
    after = wait_idle(server.url)
    assert after["localchat:blocks_used"] == 0 and after["localchat:num_requests_running"] == 0
    assert after['localchat:request_success_total{finished_reason="abort"}'] == before + 1
    engine_client.call(check_invariants)


def test_a_non_streaming_client_that_disconnects_is_aborted_too(server):
    before = metrics(server.url).get('localchat:request_success_total{finished_reason="abort"}', 0)
    # 8 samples of 450 tokens take seconds; the server looks for a vanished client every 0.5 s.
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 450, "n": 8, "temperature": 1, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(5, read=0.3))
    after = wait_idle(server.url)
    assert after["localchat:blocks_used"] == 0
    assert after['localchat:request_success_total{finished_reason="abort"}'] == before + 1


def test_metrics_page_names_and_histograms(server, oa):
    oa.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3)
    m = metrics(server.url)
    for name in ("kv_cache_usage_perc", "prefix_cache_queries_total", "prefix_cache_hits_total", "num_requests_running",
                 "num_requests_waiting", "num_preemptions_total", "cow_copies_total", "blocks_total", "blocks_used",
                 "blocks_cached", "blocks_free", "sharing_savings", "kv_utilization", "time_to_first_token_seconds_count",
                 "inter_token_latency_seconds_count", "e2e_request_latency_seconds_count", "generation_tokens_total"):
        assert f"localchat:{name}" in m, name
    assert m["localchat:blocks_total"] == 256
    assert m["localchat:blocks_used"] + m["localchat:blocks_cached"] + m["localchat:blocks_free"] == 256
    assert m["localchat:time_to_first_token_seconds_count"] >= 1 and m["localchat:inter_token_latency_seconds_count"] >= 1
    assert 0 < m["localchat:prefix_cache_hits_total"] <= m["localchat:prefix_cache_queries_total"]
