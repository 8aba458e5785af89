"""Smoke test of `localchat bench` on a tiny random Llama: every suite runs and its figures are computed."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture
def tiny_ctx(smol_tokenizer):
    from transformers import LlamaForCausalLM as HFLlama

    from helpers.tiny import loaded_from_hf, tiny_llama_config
    from localchat.bench.workloads import BenchContext

    torch.manual_seed(0)
    tok = smol_tokenizer
    hf = HFLlama(tiny_llama_config(vocab_size=len(tok), eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)).eval()
    loaded = loaded_from_hf(hf, tok)
    return BenchContext(loaded=loaded, hf_model=hf, reference=loaded)


def test_bench_all_suites_tiny(tiny_ctx):
    from localchat.bench.suites import SUITES, Sizes, run_bench

    sizes = Sizes.preset("tiny")
    suites = [s for s in SUITES if s != "page"]  # the page suite has its own test (tests/test_bench_page.py)
    report = run_bench(tiny_ctx, suites, sizes)
    d = report.as_dict()
    json.dumps(d, default=str)  # the --json output serializes

    tp = report.get("throughput", "generated tokens/s")
    assert tp is not None and tp.ours > 0 and tp.baseline > 0
    assert tp.ratio == pytest.approx(tp.ours / tp.baseline)
    details = report.details["throughput"]
    assert details["requests"] == sizes.num_requests and details["output_tokens"] > 0

    dec = report.get("decode", "single-sequence decode")
    assert dec.ours > 0 and dec.baseline > 0 and dec.ratio > 0
    # float32: our greedy ids equal transformers' (design invariant 6), so the whole run agrees.
    assert report.details["decode"]["greedy_prefix_agreement"] == sizes.decode_tokens
    sampled = report.get("decode", "single-sequence decode, temperature 0.7 and top-p 0.95")  # the app's defaults
    assert sampled.ours > 0 and len(report.details["decode"]["runs_ours_sampled"]) == sizes.decode_repeats

    used = report.get("sharing", "n=4 sampling: peak blocks")
    assert used.ours < used.baseline  # the prompt's blocks are stored once, not four times
    savings = report.get("sharing", "n=4 sampling: sharing_savings").ours
    assert 0 < savings < 1
    assert savings == pytest.approx(1 - used.ours / used.baseline)
    assert report.get("sharing", "beam width 4: peak blocks") is not None or "sharing/beam width 4" in report.skipped

    turns = report.details["multiturn"]
    assert len(turns) == sizes.multiturn_turns
    assert [t["prompt_tokens"] for t in turns] == sorted(t["prompt_tokens"] for t in turns)
    assert all(t["prefix_hit_tokens"] > 0 for t in turns[1:])  # later turns hit the prefix cache
    assert all(t["ttft_on_s"] > 0 and t["ttft_off_s"] > 0 for t in turns)

    util = report.get("memory", "kv_utilization at peak")
    assert 0 < util.ours <= 1 and 0 < util.baseline <= 1
    assert report.get("memory", "KV bytes at peak").baseline > 0

    table = report.table()
    for suite in suites:
        assert suite in table
    # what the hypervisor took while each suite measured (a shared machine's noise), where Linux says
    steal = report.details["suite_steal"]
    assert set(steal) == set(suites) and all(s is None or 0 <= s <= 1 for s in steal.values())


def test_steal_share_is_the_stolen_part_of_the_cpu_time(tmp_path, monkeypatch):
    from localchat.bench import report as report_mod

    stat = tmp_path / "stat"
    monkeypatch.setattr(report_mod, "Path", lambda _p: stat)
    stat.write_text("cpu  100 0 50 800 10 0 0 40 0 0\ncpu0 1 2 3\n")
    before = report_mod.cpu_times()
    assert before == (1000, 40)
    stat.write_text("cpu  200 0 60 1000 10 0 0 130 0 0\n")
    assert report_mod.steal_share(before, report_mod.cpu_times()) == pytest.approx(90 / 400)
    assert report_mod.steal_share(before, before) is None and report_mod.steal_share(None, before) is None
    stat.write_text("not a stat file")
    assert report_mod.cpu_times() is None


def test_bench_cli_registered():
    from localchat.cli import build_parser

    args = build_parser().parse_args(["bench", "decode", "throughput", "--quick", "--json", "x.json", "--dtype", "float32"])
    assert args.suites == ["decode", "throughput"] and args.quick and args.json == "x.json"
    assert args.func.__name__ == "cmd_bench"


def test_workload_is_seeded_and_spread():
    from localchat.bench.workloads import Sizes, make_workload

    sizes = Sizes.preset("full")
    a, b = make_workload(sizes, 49152), make_workload(sizes, 49152)
    assert a == b and len(a) == 64
    plens = [len(p) for p, _ in a]
    olens = [o for _, o in a]
    assert min(plens) >= 16 and max(plens) <= 1500 and max(plens) > 600 and min(plens) < 200
    assert min(olens) >= 16 and max(olens) <= 512 and max(olens) > 200


def test_decode_rate_starts_at_the_first_token_after_a_chunked_prompt(tiny_engine, monkeypatch):
    """A prompt longer than a step's token budget is prefilled over several steps before the first token: the
    decode figure times only the steps after that one (it once started after the first prefill chunk, so the
    long-context row counted the rest of the prompt as decoding)."""
    from localchat.bench import suites

    engine = tiny_engine(max_num_batched_tokens=16, enable_prefix_cache=False)
    steps = []  # the clock reads the steps taken: the rate is then (n - 1) / decode steps
    monkeypatch.setattr(suites.time, "perf_counter", lambda: float(len(steps)))
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: steps.append(1) or step())
    rate, ids = suites._decode_once(engine, list(range(100, 150)), 5)  # 50 prompt tokens: 4 prefill steps
    assert len(ids) == 5 and len(steps) == 4 + 4
    assert rate == 4 / 4  # 4 tokens after the first, one step each
