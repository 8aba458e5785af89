"""An engine process hands several steps' outputs on together (localchat/engine/outputs.py: OutputBatcher):
merged per request without losing a delta, a request's first tokens and its end at once, the rest at most
every interval, everything once the engine is idle."""

from __future__ import annotations

import time

from helpers.tiny import tiny_engine
from localchat.engine import EngineProcess, SamplingParams
from localchat.engine.outputs import CompletionOutput, OutputBatcher, RequestMetrics, RequestOutput, merge_outputs


def report(rid: str, texts: dict[int, tuple[str, str]], finished: bool = False) -> RequestOutput:
    """texts: index -> (cumulative text, delta); one token per character."""
    outs = [CompletionOutput(index=i, text=t, token_ids=[ord(c) for c in t], cumulative_logprob=-float(len(t)),
                             finish_reason="length" if finished else None, logprobs=[-1.0] * len(t),
                             delta_text=d, delta_token_ids=[ord(c) for c in d])
            for i, (t, d) in sorted(texts.items())]
    return RequestOutput(rid, [1, 2, 3], outs, finished, RequestMetrics(arrival_time=0.0))


def test_merge_joins_deltas_and_keeps_the_newest_state():
    merged = merge_outputs(report("a", {0: ("ab", "ab"), 1: ("x", "x")}), report("a", {0: ("abc", "c"), 1: ("xy", "y")}))
    assert [(o.text, o.delta_text, o.delta_token_ids) for o in merged.outputs] == [
        ("abc", "abc", [97, 98, 99]), ("xy", "xy", [120, 121])]
    assert merged.outputs[0].logprobs == [-1.0] * 3 and merged.outputs[0].cumulative_logprob == -3.0
    # A completion the newer report leaves out (it finished earlier) keeps its entry.
    merged = merge_outputs(report("a", {0: ("ab", "b"), 1: ("x", "x")}), report("a", {1: ("xy", "y")}))
    assert [(o.index, o.text, o.delta_text) for o in merged.outputs] == [(0, "ab", "b"), (1, "xy", "xy")]


def test_first_tokens_and_ends_go_at_once_the_rest_waits_for_the_interval():
    sent: list[list[RequestOutput]] = []
    batcher = OutputBatcher(sent.append, interval_s=60.0)
    batcher.add([report("a", {0: ("", "")})])  # nothing was sent for longer than the interval: it goes
    batcher.flush_if_due(idle=False)
    batcher.add([report("a", {0: ("", "")})])  # within the interval, no token yet: it waits
    batcher.flush_if_due(idle=False)
    assert len(sent) == 1
    batcher.add([report("a", {0: ("h", "h")})])  # the first token: its time to first token counts
    batcher.flush_if_due(idle=False)
    assert [o.outputs[0].delta_text for o in sent[-1]] == ["h"]
    sent.clear()
    for text in ("he", "hel", "hell"):
        batcher.add([report("a", {0: (text, text[-1])}), report("b", {0: (text[:1], text[:1]) if text == "he" else (text[:1], "")})])
        batcher.flush_if_due(idle=False)
    # "b"'s first token went at once, with what "a" had waiting; then the interval holds the rest.
    assert len(sent) == 1 and {o.request_id: o.outputs[0].delta_text for o in sent[0]} == {"a": "e", "b": "h"}
    batcher.add([report("a", {0: ("hello", "o")}, finished=True)])
    batcher.flush_if_due(idle=False)
    a_end = {o.request_id: o for o in sent[1]}["a"]
    assert a_end.finished and a_end.outputs[0].delta_text == "llo" and a_end.outputs[0].text == "hello"
    assert "".join(o.outputs[0].delta_text for batch in sent for o in batch if o.request_id == "a") == "ello"


def test_the_interval_and_an_idle_engine_flush():
    sent: list[list[RequestOutput]] = []
    batcher = OutputBatcher(sent.append, interval_s=0.05)
    batcher.add([report("a", {0: ("h", "h")})])
    batcher.flush_if_due(idle=False)
    batcher.add([report("a", {0: ("hi", "i")})])
    batcher.flush_if_due(idle=False)
    assert len(sent) == 1
    time.sleep(0.06)
    batcher.flush_if_due(idle=False)
    assert len(sent) == 2
    batcher.add([report("a", {0: ("hi!", "!")})])
    batcher.flush_if_due(idle=True)
    assert len(sent) == 3 and batcher.pending == {}


def test_an_engine_process_sends_fewer_updates_that_add_up_to_the_reply():
    client = EngineProcess(tiny_engine, seed=3, num_blocks=256, block_size=8)
    try:
        params = SamplingParams(temperature=1.0, seed=7, n=2, max_tokens=60, ignore_eos=True)
        updates = list(client.submit("Tell me about owls", params=params))
        final = updates[-1]
        assert final.finished and [len(o.token_ids) for o in final.outputs] == [60, 60]
        for o in final.outputs:
            assert "".join(u.outputs[o.index].delta_text for u in updates) == o.text
            assert [t for u in updates for t in u.outputs[o.index].delta_token_ids] == o.token_ids
        # The first update carries the first token alone; the tiny engine steps far faster than the
        # interval, so the other 59 steps arrive in a few updates.
        assert [len(o.delta_token_ids) for o in updates[0].outputs] == [1, 1]
        assert len(updates) < 30
    finally:
        client.shutdown()
