"""Batched sampling over one step's logits: penalties, temperature, top-k, top-p, min-p, seeds,
and the log-probabilities a request asks to see (the chosen token's, and the top alternatives).

Each row is one sequence. Rows with a seed draw from their own torch.Generator, so a seeded
request gives the same tokens whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from localchat.engine.sequence import Sequence


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float]  # log-probability of each chosen token under the model's distribution
    # Per row, the params.top_logprobs most likely (token id, log-probability) pairs, most likely
    # first; None for rows that did not ask.
    top_logprobs: list[list[tuple[int, float]] | None] | None = None


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


def apply_presence_frequency_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """OpenAI's definition, over the tokens generated so far (the prompt does not count):
    logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty.

    One scatter over the rows that ask, so a batch costs one pass whatever their lengths."""
    rows = [r for r, s in enumerate(seqs) if s.params.presence_penalty or s.params.frequency_penalty]
    outputs = [seqs[r].output_token_ids for r in rows]
    longest = max((len(o) for o in outputs), default=0)
    if longest == 0:
        return logits
    vocab = logits.shape[-1]
    # Pad with an extra column `vocab` that is dropped after counting.
    ids = torch.full((len(rows), longest), vocab, dtype=torch.long)
    for i, out in enumerate(outputs):
        ids[i, : len(out)] = torch.tensor(out, dtype=torch.long)
    counts = torch.zeros(len(rows), vocab + 1, dtype=logits.dtype).scatter_add_(1, ids, torch.ones_like(ids, dtype=logits.dtype))
    counts = counts[:, :vocab].to(logits.device)
    freq = torch.tensor([seqs[r].params.frequency_penalty for r in rows], dtype=logits.dtype, device=logits.device)
    pres = torch.tensor([seqs[r].params.presence_penalty for r in rows], dtype=logits.dtype, device=logits.device)
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    penalty = counts * freq[:, None] + (counts > 0).to(logits.dtype) * pres[:, None]
    # Out of place: the step's logits may be an inference-mode tensor, which refuses in-place updates.
    return logits.index_put((index,), logits[index] - penalty)


def _cpu_float32(logits: torch.Tensor) -> np.ndarray | None:
    """The logits as a numpy array when they are float32 on the CPU (a view, no copy), else None.

    Why: torch's CPU argmax and isfinite().all() walk a row one element at a time; on the test machines they
    took ~130 and ~140 us for one row of the default model's 49,152 logits, numpy's vectorized argmax, max and
    min 6-7 us each. At ~80 tokens a second a step is ~12 ms, so that was 2% of each token."""
    if logits.device.type != "cpu" or logits.dtype != torch.float32:
        return None
    return logits.numpy()


def rows_finite(logits: torch.Tensor) -> list[bool]:
    """For each row of [rows, vocab] logits: whether it is free of NaN and infinities."""
    values = _cpu_float32(logits)
    if values is None:
        return torch.isfinite(logits).all(dim=-1).tolist()
    return (np.isfinite(values.max(axis=-1)) & np.isfinite(values.min(axis=-1))).tolist()  # max and min keep NaN


def greedy_ids(logits: torch.Tensor) -> list[int]:
    """The most likely token of each row (the first, on ties, as torch.argmax)."""
    values = _cpu_float32(logits)
    return logits.argmax(dim=-1).tolist() if values is None else values.argmax(axis=-1).tolist()


def top_alternatives(logits: torch.Tensor, norms: list[float], seqs: list[Sequence]) -> list[list[tuple[int, float]] | None] | None:
    """The most likely tokens and their log-probabilities (logit minus the row's logsumexp `norms`), only for
    the rows that ask (one topk)."""
    rows = [r for r, s in enumerate(seqs) if s.params.top_logprobs]
    if not rows:
        return None
    k = max(seqs[r].params.top_logprobs for r in rows)
    values, indices = torch.topk(logits[torch.tensor(rows, device=logits.device)], k, dim=-1)
    values, indices = values.tolist(), indices.tolist()
    result: list[list[tuple[int, float]] | None] = [None] * len(seqs)
    for i, r in enumerate(rows):
        wanted = seqs[r].params.top_logprobs
        result[r] = list(zip(indices[i][:wanted], [v - norms[r] for v in values[i][:wanted]]))
    return result


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


# Most rows keep far fewer tokens than the vocabulary (top-k, a top-p nucleus, min-p): they are drawn
# together from each row's CANDIDATES most likely tokens, one topk for the batch instead of a full
# sort per row. A row whose kept set may reach beyond them is drawn over the whole vocabulary.
CANDIDATES = 1024


def _race(probs: torch.Tensor, seqs: list[Sequence], default_generator: torch.Generator | None) -> torch.Tensor:
    """Exponential race per row: argmax(p / E) with E ~ Exp(1) draws exactly from p (unnormalized).
    Seeded rows draw from their own generator, so their tokens do not depend on the batch."""
    # Drawn on the CPU, where the generators live, whatever the logits' device.
    noise = torch.empty(probs.shape, dtype=probs.dtype)
    shared = [i for i, s in enumerate(seqs) if s.generator is None]
    if len(shared) == len(seqs):
        noise.exponential_(generator=default_generator)
    elif shared:
        noise[shared] = torch.empty(len(shared), probs.shape[-1], dtype=probs.dtype).exponential_(generator=default_generator)
    for i, s in enumerate(seqs):
        if s.generator is not None:
            noise[i].exponential_(generator=s.generator)
    return (probs / noise.to(probs.device)).argmax(dim=-1)


def sample_candidates(logits: torch.Tensor, seqs: list[Sequence], default_generator: torch.Generator | None = None) -> list[int | None]:
    """filter_logits' distribution for every row at once, over its most likely tokens; None for a
    row whose kept set may not fit among them (the caller draws it over the whole vocabulary)."""
    params = [s.params for s in seqs]
    vocab, device, inf = logits.shape[-1], logits.device, float("inf")

    def column(values, dtype=logits.dtype):
        return torch.tensor(values, dtype=dtype, device=device)

    scaled = logits / column([p.temperature for p in params])[:, None]
    k = min(vocab, max([CANDIDATES] + [p.top_k for p in params]))
    vals, idx = torch.topk(scaled, k, dim=-1)  # most likely first
    top_k = column([p.top_k if 0 < p.top_k < vocab else 0 for p in params], torch.long)
    limited = top_k > 0
    kth = vals.gather(1, (top_k.clamp(min=1) - 1)[:, None])
    vals = torch.where(limited[:, None] & (vals < kth), -inf, vals)  # ties with the k-th stay, as in filter_logits
    # top-p and min-p see the distribution over the top-k set if there is one, else over the vocabulary.
    norm = torch.where(limited, torch.logsumexp(vals, dim=-1), torch.logsumexp(scaled, dim=-1))
    probs = torch.exp(vals - norm[:, None])
    top_p, min_p = column([p.top_p for p in params]), column([p.min_p for p in params])
    drop = probs.cumsum(dim=-1) - probs >= top_p[:, None]
    drop[:, 0] = False
    threshold = probs[:, :1] * min_p[:, None]
    fits = limited | (probs.sum(dim=-1) >= top_p) & (top_p < 1) | (min_p > 0) & (probs[:, -1] < threshold[:, 0])
    probs = probs.masked_fill(drop | (probs < threshold), 0.0)
    if k == vocab:
        fits[:] = True
    rows = fits.nonzero().flatten().tolist()
    result: list[int | None] = [None] * len(seqs)
    if rows:
        chosen = _race(probs[rows], [seqs[r] for r in rows], default_generator)
        for r, token in zip(rows, idx[rows].gather(1, chosen[:, None]).flatten().tolist()):
            result[r] = token
    return result


def sample(logits: torch.Tensor, seqs: list[Sequence], default_generator: torch.Generator | None = None) -> SampleResult:
    """Choose one token per row. `logits` is float32 [len(seqs), vocab] and may be modified."""
    logits = apply_repetition_penalty(logits, seqs)
    logits = apply_presence_frequency_penalties(logits, seqs)
    values = _cpu_float32(logits)
    token_ids = greedy_ids(logits)
    rows = [r for r, s in enumerate(seqs) if not s.params.greedy]
    if values is None:
        picked = sample_candidates(logits[rows], [seqs[r] for r in rows], default_generator) if rows else []
    else:
        picked = [draw_row(values[r], seqs[r], default_generator) for r in rows]
    for row, token in zip(rows, picked):
        if token is None:  # the kept set may be wider than the candidates: the whole vocabulary
            seq, p = seqs[row], seqs[row].params
            probs = filter_logits(logits[row] / p.temperature, p.top_k, p.top_p, p.min_p).softmax(dim=-1)
            token = int(_race(probs[None], [seq], default_generator)[0])
        token_ids[row] = token
    if values is None:
        norms = torch.logsumexp(logits, dim=-1).tolist()
        chosen = logits.gather(1, torch.tensor(token_ids, device=logits.device)[:, None]).squeeze(1).tolist()
    else:
        norms = _logsumexp_rows(values).tolist()
        chosen = values[np.arange(len(token_ids)), token_ids].tolist()
    logprobs = [c - n for c, n in zip(chosen, norms)]
    return SampleResult(token_ids=token_ids, logprobs=logprobs, top_logprobs=top_alternatives(logits, norms, seqs))


# ---- one row on the CPU, in numpy ---------------------------------------------------------------------------
# On the CPU the batched candidate path above cost ~1.3 ms a token for one chat row with the app's default
# settings (temperature 0.7, top-p 0.95): torch.topk of 1,024 out of 49,152 logits, a logsumexp over the
# whole row and some twenty small ops, ~15% of a decode step (benchmarks/NOTES.md, session 19). Here one
# vectorized pass weighs the row, and the candidates are the tokens whose weight is at least a share of the
# most likely one's: every token outside them is lighter than every token inside, so the kept set is decided
# exactly whenever it lies inside them, and only the candidates (a few dozen to a few hundred) are sorted.
CANDIDATE_SHARES = (1e-4, 1e-9)  # the second try, for a flatter row, before the whole-vocabulary path
# A row flatter than this many candidates needs a sort of most of the vocabulary either way, and torch's
# (filter_logits) is faster than numpy's stable one: 4-5 ms against ~5 plus this path's own passes.
CANDIDATE_CAP = 2048


def draw_row(row: np.ndarray, seq: Sequence, default_generator: torch.Generator | None = None) -> int | None:
    """filter_logits' distribution for one row of float32 logits, drawn with the row's generator (or the
    shared one); None when the kept set may reach beyond the candidates of every share tried."""
    p = seq.params
    weights = row - row.max()
    weights /= np.float32(p.temperature)
    np.exp(weights, out=weights)  # the most likely token weighs 1
    if not (0 < p.top_k < row.shape[0]) and p.top_p >= 1.0 and p.min_p <= 0.0:
        ids = None  # nothing is cut: the whole row
    else:
        for share in CANDIDATE_SHARES:
            ids = np.flatnonzero(weights >= share)
            if ids.shape[0] > CANDIDATE_CAP:
                return None
            kept = _kept(ids, row, weights, p, share)
            if kept is not None:
                ids, weights = kept
                break
        else:
            return None
    generator = seq.generator if seq.generator is not None else default_generator
    noise = torch.empty(weights.shape[0], dtype=torch.float64).exponential_(generator=generator)
    pick = int(np.argmax(weights / noise.numpy()))  # the exponential race of _race
    return pick if ids is None else int(ids[pick])


def _kept(ids: np.ndarray, row: np.ndarray, weights: np.ndarray, p, share: float):
    """The kept (token ids, weights) among the candidates `ids`, as filter_logits keeps them over the whole
    row; None when tokens below `share` could be kept too."""
    ids = ids[np.argsort(-row[ids], kind="stable")]  # most likely first, ties by id
    w = weights[ids].astype(np.float64)
    limited = 0 < p.top_k < row.shape[0]
    fits = limited
    if limited:
        if ids.shape[0] < p.top_k:
            return None  # the k-th most likely token is not a candidate
        keep = row[ids] >= row[ids[p.top_k - 1]]  # ties with the k-th stay, as in filter_logits
        ids, w = ids[keep], w[keep]
    norm = w.sum() if limited else float(weights.sum(dtype=np.float64))
    if p.top_p < 1.0:
        probs = w / norm
        drop = np.cumsum(probs) - probs >= p.top_p  # the mass before a token already reaches top-p
        drop[0] = False
        fits = fits or probs.sum() >= p.top_p  # then the first token outside is dropped, and all after it
        ids, w = ids[~drop], w[~drop]
    if p.min_p > 0.0:
        fits = fits or share <= p.min_p  # every token outside weighs less than min-p x the most likely one
        keep = w >= w[0] * p.min_p
        ids, w = ids[keep], w[keep]
    return (ids, w) if fits else None


def _logsumexp_rows(values: np.ndarray) -> np.ndarray:
    top = values.max(axis=-1, keepdims=True)
    return top[:, 0] + np.log(np.exp(values - top).sum(axis=-1))
