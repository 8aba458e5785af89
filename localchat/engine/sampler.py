"""Batched sampling over one step's logits: penalties, temperature, top-k, top-p, min-p, seeds.

Each row is one sequence. Rows with a seed draw from their own torch.Generator, so a seeded
request gives the same tokens whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from localchat.engine.sequence import Sequence


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float]  # log-probability of each chosen token under the model's distribution


def apply_repetition_penalty(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """transformers' definition: every token already in the sequence (prompt included) has its
    logit divided by the penalty if positive, multiplied if negative."""
    for row, seq in enumerate(seqs):
        penalty = seq.params.repetition_penalty
        if penalty == 1.0:
            continue
        ids = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=logits.device)
        picked = logits[row, ids]
        logits[row, ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Mask (to -inf) the tokens outside top-k, outside the top-p nucleus, or below min_p x max prob."""
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token if the mass before it already reaches top_p; the top token always stays.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        drop[..., 0] = False
        mask = torch.zeros_like(drop).scatter(-1, order, drop)
        logits = logits.masked_fill(mask, float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * min_p
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def sample(logits: torch.Tensor, seqs: list[Sequence], default_generator: torch.Generator | None = None) -> SampleResult:
    """Choose one token per row. `logits` is float32 [len(seqs), vocab] and may be modified."""
    logits = apply_repetition_penalty(logits, seqs)
    logprobs_all = torch.log_softmax(logits, dim=-1)
    greedy_ids = logits.argmax(dim=-1)
    token_ids = greedy_ids.tolist()
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.greedy:
            continue
        row_logits = filter_logits(logits[row] / p.temperature, p.top_k, p.top_p, p.min_p)
        probs = row_logits.softmax(dim=-1)
        generator = seq.generator if seq.generator is not None else default_generator
        # Exponential-race sampling: argmax(p / E) with E ~ Exp(1) draws exactly from p.
        noise = torch.empty_like(probs).exponential_(generator=generator)
        token_ids[row] = int((probs / noise).argmax())
    ids = torch.tensor(token_ids, dtype=torch.long, device=logits.device)
    chosen = logprobs_all.gather(1, ids[:, None]).squeeze(1).tolist()
    return SampleResult(token_ids=token_ids, logprobs=chosen)
