"""`localchat bench page` on the tiny model: the page suite runs end to end in Chromium and reports its
figures (the ratios mean nothing on a random model; `localchat bench page` on the real one measures)."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from conftest import skip_or_fail

pytestmark = [pytest.mark.filterwarnings("ignore::Warning:gradio.*"), pytest.mark.browser]


def test_page_suite_on_the_tiny_model(smol_tokenizer, tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM as HFLlama

    from helpers.tiny import loaded_from_hf, tiny_llama_config
    from localchat.bench.page import REGENERATES, missing_browser, run_order
    from localchat.bench.report import Report
    from localchat.bench.suites import SUITES, run_bench
    from localchat.bench.workloads import BenchContext, Sizes

    why = missing_browser()
    if why:
        skip_or_fail(why)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    torch.manual_seed(0)
    tok = smol_tokenizer
    hf = HFLlama(tiny_llama_config(vocab_size=len(tok), eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)).eval()
    ctx = BenchContext(loaded=loaded_from_hf(hf, tok), hf_model=hf)
    assert "page" in SUITES
    sizes = Sizes.preset("tiny")
    report: Report = run_bench(ctx, ["page"], sizes)
    json.dumps(report.as_dict(), default=str)
    details = report.details["page"]
    for key, label in (("page_closed", "memory panel closed"), ("page_open", "memory panel open")):
        row = report.get("page", f"one reply in the page, {label}")
        assert row is not None and row.ours > 0 and row.baseline > 0 and row.ratio == pytest.approx(row.ours / row.baseline)
        assert len(details["paired_ratios"][key]) == sizes.page_repeats
        assert details["paired_median"][key] == pytest.approx(statistics.median(details["paired_ratios"][key]))
    assert details["order"] == run_order(sizes.page_repeats)
    # Whether the page showed exactly what `generate` printed is reported, not asserted here: a random
    # model's logits are nearly tied, so a prompt prefilled whole (generate) and one read back from the
    # prefix cache (the page, same engine) can round differently and pick another greedy token. On the
    # real model `localchat bench page` compares the texts.
    assert isinstance(details["same_text"], bool)
    assert all(run["tokens"] > 0 for key in ("generate", "page_closed", "page_open") for run in details[key])
    assert details["branch_click_ms"] > 0 and len(details["branch_click_runs_ms"]) == 6
    runs = details["regenerate_first_token_runs_ms"]
    assert len(runs) == len(details["regenerate_engine"]) == REGENERATES and all(ms > 0 for ms in runs)
    assert details["regenerate_first_token_ms"] == statistics.median(runs)
    assert details["switch_then_send_first_token_ms"] > 0
    # each reply came from the history in the prefix cache: all of it but the newest tokens
    follow = details["switch_then_send_engine"]
    assert all(e["prefix_hit_tokens"] >= sizes.page_history_tokens // 2 for e in [*details["regenerate_engine"], follow])
    assert follow["prefix_hit_tokens"] < follow["prompt_tokens"] - 1  # its new message is computed
    assert "page" in report.table()


def test_the_page_replies_take_turns():
    from localchat.bench.page import round_order

    orders = [round_order(r) for r in range(4)]
    assert all(sorted(o) == ["page_closed", "page_open"] for o in orders)
    assert [o[0] for o in orders] == ["page_closed", "page_open", "page_closed", "page_open"]


def test_every_page_reply_is_measured_between_two_runs_of_generate():
    from localchat.bench.page import run_order

    order = run_order(3)
    assert order.count("generate") == 7 and order.count("page_closed") == order.count("page_open") == 3
    assert order[0] == order[-1] == "generate"
    assert all(order[i - 1] == order[i + 1] == "generate" for i, key in enumerate(order) if key != "generate")


def test_each_reply_is_compared_with_the_generate_runs_beside_it():
    from localchat.bench.page import Growth, paired_ratios

    def run(tok_s: float) -> Growth:
        return Growth("x", 0.0, 1.0, tokens=int(tok_s))

    # the machine slows down half way: each reply is held against the mean of the two runs beside it
    sequence = [("generate", run(100)), ("page_closed", run(90)), ("page_open", run(80)),
                ("generate", run(100)), ("page_open", run(45)), ("page_closed", run(48)), ("generate", run(50))]
    assert paired_ratios(sequence, "page_closed") == pytest.approx([0.9, 48 / 75])
    assert paired_ratios(sequence, "page_open") == pytest.approx([0.8, 45 / 75])
    # at an end only one neighbour is there; a reply with none is left out
    assert paired_ratios([("page_open", run(60)), ("generate", run(100))], "page_open") == pytest.approx([0.6])
    assert paired_ratios([("page_open", run(60))], "page_open") == []
