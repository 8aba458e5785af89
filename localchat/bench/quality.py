"""What running a GGUF's own quantized weights costs in quality, measured against the float32 reference.

Two measures, both on our engine and both against the float32 dequantization of the same file (which is the
model itself: the quantized values are exact in float32): greedy replies to chat prompts (how many are
identical, and the share of tokens inside the common prefix), and the perplexity of a fixed text
(localchat/bench/data/perplexity.txt), beside llama.cpp's on the same text and token ids when it is installed.
"""

from __future__ import annotations

from pathlib import Path

from localchat.engine import Engine, EngineConfig, SamplingParams
from localchat.model.chat_template import encode, prompt_ids

PERPLEXITY_TEXT = Path(__file__).with_name("data") / "perplexity.txt"

CHAT_PROMPTS = (
    "Why is the sky blue?",
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Explain what a hash table is in two sentences.",
    "Give me three tips for learning to cook.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Write a short story about a dragon who learns to cook.",
    "List the planets of the solar system.",
    "How do I reverse a list in Python?",
    "What causes rain?",
    "Name a color.",
)


def greedy_replies(loaded, prompts, max_tokens: int) -> list[list[int]]:
    """Each prompt's greedy reply (stopping at the end of the turn or after max_tokens), all batched together."""
    engine = Engine.from_loaded(loaded, EngineConfig(kv_cache_gb=0.25))
    ids = [prompt_ids(loaded.tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    outs = engine.generate(prompt_token_ids=ids, params=SamplingParams(temperature=0, max_tokens=max_tokens))
    return [o.outputs[0].token_ids for o in outs]


def agreement(replies: list[list[int]], reference: list[list[int]]) -> dict:
    """Identical replies, and the share of the reference's tokens that lie inside the common prefix."""
    identical, common, total = 0, 0, 0
    for a, b in zip(replies, reference):
        prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        identical += a == b
        common += prefix
        total += len(b)
    return {"prompts": len(reference), "identical": identical, "common_prefix_share": common / total if total else 1.0}


def perplexity_ids(tokenizer) -> list[int]:
    return encode(tokenizer, PERPLEXITY_TEXT.read_text(encoding="utf-8"))


def suite_quality(ctx, sizes, report, state: dict) -> None:
    """Greedy agreement with the float32 reference on CHAT_PROMPTS, and perplexity of the fixed text: ours,
    the float32 reference's, and llama.cpp's on the same GGUF and token ids (when it is installed)."""
    from localchat.bench.baselines import llama_cpp_perplexity
    from localchat.model.evaluate import perplexity

    reference = ctx.float32_reference()
    prompts = CHAT_PROMPTS if sizes.quality_tokens >= 16 else CHAT_PROMPTS[:3]
    ours = greedy_replies(ctx.loaded, prompts, sizes.quality_tokens)
    ref = greedy_replies(reference, prompts, sizes.quality_tokens)
    agree = agreement(ours, ref)
    details = report.details["quality"] = {"weights": ctx.weights, "activations": ctx.activations,
                                           "reply_tokens": sizes.quality_tokens, **agree}
    report.add("quality", f"greedy replies identical to float32 (of {agree['prompts']})", agree["identical"], None, "", "replies")
    report.add("quality", "tokens in the common prefix with float32", agree["common_prefix_share"], None, "", "share")
    ids = perplexity_ids(ctx.tokenizer)
    if sizes.quality_tokens < 16:
        ids = ids[:64]
    ppl = perplexity(ctx.loaded, ids)
    ref_ppl = perplexity(reference, ids)
    details.update({"perplexity_tokens": len(ids), "perplexity": ppl, "perplexity_float32": ref_ppl})
    report.add("quality", "perplexity of the fixed text", ppl, ref_ppl, "float32 reference", "ppl")
    if ctx.activations != "float32":  # the same weights with exact activations: what rounding the inputs costs
        with ctx.float32_activations():
            exact = agreement(greedy_replies(ctx.loaded, prompts, sizes.quality_tokens), ref)
            exact_ppl = perplexity(ctx.loaded, ids)
        details.update({"float32_activations": exact, "perplexity_float32_activations": exact_ppl})
        report.add("quality", f"greedy replies identical to float32, float32 activations (of {exact['prompts']})",
                   exact["identical"], None, "", "replies")
        report.add("quality", "perplexity of the fixed text", ppl, exact_ppl, "ours, float32 activations", "ppl")
    if ctx.gguf_path is not None:
        try:
            lc = llama_cpp_perplexity(ctx.gguf_path, ids)
        except Exception as exc:  # noqa: BLE001 - an optional baseline must not end the bench
            report.skipped["quality/llama.cpp"] = f"{type(exc).__name__}: {exc}"
        else:
            if lc is not None:
                details["perplexity_llama_cpp"] = lc
                report.add("quality", "perplexity of the fixed text", ppl, lc, "llama.cpp (same GGUF)", "ppl")
