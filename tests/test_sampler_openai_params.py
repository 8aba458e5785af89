"""The sampler features the OpenAI API needs: presence/frequency penalties (OpenAI's definition),
top-k alternatives with their log-probabilities, and their validation in SamplingParams."""

from __future__ import annotations

import pytest
import torch

from localchat.engine import SamplingParams
from localchat.engine.sampler import apply_presence_frequency_penalties, greedy_ids, rows_finite, sample, top_alternatives
from localchat.engine.sequence import Sequence


def seq(prompt: list[int], output: list[int], **params) -> Sequence:
    s = Sequence(seq_id=0, request_id="r", prompt_token_ids=prompt, params=SamplingParams(**params))
    s.token_ids = list(prompt) + list(output)
    return s


def reference_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """OpenAI's formula, one token at a time: mu[j] - c[j] * frequency - (c[j] > 0) * presence,
    c[j] counting token j in the generated output only."""
    out = logits.clone()
    for row, s in enumerate(seqs):
        for token in set(s.output_token_ids):
            count = s.output_token_ids.count(token)
            out[row, token] -= count * s.params.frequency_penalty + (1.0 if count else 0.0) * s.params.presence_penalty
    return out


def test_penalties_follow_openais_definition():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    seqs = [
        seq([1, 2, 3], [5, 5, 7, 5], presence_penalty=0.5, frequency_penalty=0.3),
        seq([5, 5], [], presence_penalty=1.0, frequency_penalty=1.0),  # nothing generated yet: unchanged
        seq([9], [9, 9, 3], frequency_penalty=-0.7),  # negative: encourages repeats
        seq([4], [4, 4], presence_penalty=0.0),  # no penalty asked: unchanged
    ]
    expected = reference_penalties(logits, seqs)
    got = apply_presence_frequency_penalties(logits.clone(), seqs)
    torch.testing.assert_close(got, expected)
    assert got[0, 5] == pytest.approx(logits[0, 5] - 3 * 0.3 - 0.5)
    assert torch.equal(got[1], logits[1]) and torch.equal(got[3], logits[3])
    assert got[0, 1] == logits[0, 1]  # a prompt token is not penalised


def test_a_large_presence_penalty_changes_the_greedy_choice():
    logits = torch.tensor([[0.0, 3.0, 2.5, 0.0]])
    plain = sample(logits.clone(), [seq([0], [1], temperature=0)]).token_ids
    penalised = sample(logits.clone(), [seq([0], [1], temperature=0, presence_penalty=1.0)]).token_ids
    assert plain == [1] and penalised == [2]


def test_top_alternatives_only_for_rows_that_ask():
    torch.manual_seed(1)
    logits = torch.randn(3, 40)
    logprobs = torch.log_softmax(logits, dim=-1)
    norms = torch.logsumexp(logits, dim=-1).tolist()
    seqs = [seq([1], [], logprobs=True, top_logprobs=3), seq([1], []), seq([1], [], logprobs=True, top_logprobs=5)]
    tops = top_alternatives(logits, norms, seqs)
    assert tops[1] is None and len(tops[0]) == 3 and len(tops[2]) == 5
    for row in (0, 2):
        values, indices = torch.topk(logprobs[row], len(tops[row]))
        assert [t for t, _ in tops[row]] == indices.tolist()
        assert [v for _, v in tops[row]] == pytest.approx(values.tolist())
    assert top_alternatives(logits, norms, [seq([1], []), seq([1], [], logprobs=True)]) is None


def test_sample_reports_the_chosen_tokens_alternatives():
    logits = torch.tensor([[0.0, 4.0, 1.0, 2.0], [1.0, 0.0, 0.0, 0.0]])
    result = sample(logits.clone(), [seq([0], [], temperature=0, logprobs=True, top_logprobs=2), seq([0], [], temperature=0)])
    assert result.token_ids == [1, 0]
    top = result.top_logprobs[0]
    assert [t for t, _ in top] == [1, 3] and top[0][1] == pytest.approx(result.logprobs[0])
    assert result.top_logprobs[1] is None


@pytest.mark.parametrize("changes, message", [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"top_logprobs": 3}, "needs logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
])
def test_bad_values_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**changes)


def test_engine_streams_top_logprobs_per_token(tiny_engine):
    engine = tiny_engine(num_blocks=64, block_size=8)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=True, top_logprobs=4, n=2)
    out = engine.generate(prompt_token_ids=[[1, 2, 3, 4, 5]], params=params)[0]
    assert len(out.outputs) == 2
    for o in out.outputs:
        assert len(o.top_logprobs) == len(o.token_ids) == len(o.logprobs) == 5
        for token, logprob, top in zip(o.token_ids, o.logprobs, o.top_logprobs):
            assert len(top) == 4 and top[0][0] == token and top[0][1] == pytest.approx(logprob)  # greedy: the top one
            assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)


# ------------------------------------------------------------------ batched draws over candidates
def exact_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    from localchat.engine.sampler import filter_logits

    return filter_logits(logits / p.temperature, p.top_k, p.top_p, p.min_p).softmax(dim=-1)


DRAWS = [  # (params, whether the kept set lies among 12 candidates)
    (SamplingParams(temperature=0.8, top_p=0.9), True),  # a nucleus inside the candidates
    (SamplingParams(temperature=1.0, top_p=1.0, top_k=5), True),
    (SamplingParams(temperature=1.3, top_p=0.95, min_p=0.3), True),  # min-p confines it
    (SamplingParams(temperature=1.3, top_p=0.95, min_p=0.05), False),  # 21 tokens kept, 12 candidates
    (SamplingParams(temperature=0.7, top_p=1.0, min_p=0.2), True),
    (SamplingParams(temperature=5.0, top_p=0.99), False),  # a flat distribution: the nucleus is wider
    (SamplingParams(temperature=1.0, top_p=1.0), False),  # no truncation: the whole vocabulary
]


def likely_logits() -> torch.Tensor:
    torch.manual_seed(3)
    logits = torch.randn(40) * 2.0
    logits[:6] += 3.0  # a few likely tokens
    return logits


@pytest.mark.parametrize("params, fits", DRAWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_draws_follow_filter_logits(monkeypatch, params, fits, dtype):
    """Many rows drawn in one batch match the exact distribution of localchat/engine/sampler.py's
    filter_logits, and never pick a filtered token: float32 CPU logits row by row in numpy (draw_row),
    others on the batched candidate path (sample_candidates), each with its whole-vocabulary fallback."""
    from localchat.engine import sampler

    monkeypatch.setattr(sampler, "CANDIDATES", 12)
    monkeypatch.setattr(sampler, "CANDIDATE_SHARES", (0.05,))
    logits = likely_logits().to(dtype)
    rows = 4000
    seqs = [seq([0], [], **params.__dict__) for _ in range(rows)]
    batch = logits.expand(rows, -1).clone()
    if dtype == torch.float64:
        picked = sampler.sample_candidates(batch, seqs, torch.Generator().manual_seed(1))
        assert all((t is not None) is fits for t in picked)
    tokens = sampler.sample(batch.clone(), seqs, torch.Generator().manual_seed(2)).token_ids
    counts = torch.bincount(torch.tensor(tokens), minlength=40).double() / rows
    expected = exact_probs(logits.double(), params)
    assert counts[expected == 0].sum() == 0
    assert (counts - expected).abs().max() < 0.03, (counts, expected)


@pytest.mark.parametrize("params, _", DRAWS)
@pytest.mark.parametrize("share", [0.3, 0.05, 1e-3, 1e-9])
def test_a_row_is_drawn_among_its_candidates_only_when_its_kept_set_is_among_them(monkeypatch, params, _, share):
    """draw_row's candidates are the tokens weighing at least `share` of the most likely one (after the
    temperature): it draws among them only if filter_logits keeps no token outside them, and then the
    token is one filter_logits keeps; else it leaves the row to the whole-vocabulary path (None)."""
    from localchat.engine import sampler

    monkeypatch.setattr(sampler, "CANDIDATE_SHARES", (share,))
    logits = likely_logits()
    expected = exact_probs(logits, params)
    weights = torch.exp((logits - logits.max()) / params.temperature)
    outside = bool(((expected > 0) & (weights < share)).any())
    truncated = 0 < params.top_k < 40 or params.top_p < 1 or params.min_p > 0
    for draw in range(50):
        token = sampler.draw_row(logits.numpy(), seq([0], [], **params.__dict__), torch.Generator().manual_seed(draw))
        if outside and truncated:
            assert token is None
        else:
            assert token is not None and expected[token] > 0


def test_a_row_with_a_nucleus_is_decided_on_few_candidates(monkeypatch):
    """The default settings on a peaked row of a real vocabulary's size: the first share decides it, and
    only its candidates are sorted."""
    from localchat.engine import sampler

    sorted_sizes = []
    argsort = sampler.np.argsort
    monkeypatch.setattr(sampler.np, "argsort", lambda a, **kw: sorted_sizes.append(a.shape[0]) or argsort(a, **kw))
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(49152, generator=gen) * 2.0
    logits[:20] += 12.0
    params = SamplingParams()  # the app's defaults: temperature 0.7, top-p 0.95
    token = sampler.draw_row(logits.numpy(), seq([0], [], **params.__dict__), gen)
    assert token is not None and exact_probs(logits, params)[token] > 0
    weights = torch.exp((logits - logits.max()) / params.temperature)
    assert sorted_sizes == [int((weights >= sampler.CANDIDATE_SHARES[0]).sum())] and 1 < sorted_sizes[0] < 100


def test_seeded_rows_draw_the_same_tokens_in_any_batch():
    from localchat.engine import sampler

    torch.manual_seed(4)
    logits = torch.randn(3, 3000) * 3
    params = dict(temperature=0.9, top_p=0.9)

    def seeded(seed):
        s = seq([0], [], seed=seed, **params)
        s.generator = torch.Generator().manual_seed(seed)
        return s

    alone = sampler.sample(logits[:1].clone(), [seeded(7)]).token_ids[0]
    mixed = sampler.sample(logits.clone(), [seeded(7), seq([0], [], **params), seeded(8)], torch.Generator().manual_seed(0)).token_ids
    assert mixed[0] == alone


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_rows_and_greedy_ids_agree_with_torch(dtype):
    """The numpy shortcuts for float32 CPU logits (and the torch path for the rest) against torch itself:
    NaN, +inf and -inf anywhere in a row, and ties (the first of equal maxima wins)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 1000, generator=gen).to(dtype)
    logits[1, 0], logits[2, 999], logits[3, 500], logits[4, 7] = float("nan"), float("inf"), float("-inf"), float("nan")
    logits[4, 8] = float("inf")
    assert rows_finite(logits) == torch.isfinite(logits).all(dim=-1).tolist() == [True, False, False, False, False, True, True, True]
    ties = torch.zeros(3, 1000, dtype=dtype)
    ties[0, [5, 9]] = 2.0
    ties[1, [999, 3]] = 1.0
    assert greedy_ids(ties) == ties.argmax(dim=-1).tolist() == [5, 3, 0]
    finite = logits[[0, 5, 6, 7]]
    assert greedy_ids(finite) == finite.argmax(dim=-1).tolist()
    with torch.inference_mode():  # the engine's logits are inference tensors
        assert rows_finite(logits.clone()) == rows_finite(logits)


def test_a_flat_row_goes_to_the_whole_vocabulary_path_unsorted(monkeypatch):
    """A row with more candidates than CANDIDATE_CAP is left to filter_logits (None) before numpy sorts any of
    it; sample still draws it from filter_logits' kept set."""
    from localchat.engine import sampler

    sorted_sizes = []
    argsort = sampler.np.argsort
    monkeypatch.setattr(sampler.np, "argsort", lambda a, **kw: sorted_sizes.append(a.shape[0]) or argsort(a, **kw))
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(49152, generator=gen) * 0.05  # a random-weight model's row: nearly uniform
    logits[:10] += 20.0  # ... but for a few tokens of which top-p keeps only some
    params = SamplingParams(temperature=0.7, top_p=0.5)
    flat = logits.clone()
    flat[:10] -= 20.0
    assert sampler.draw_row(flat.numpy(), seq([0], [], **params.__dict__), gen) is None
    assert sorted_sizes == []
    token = sampler.sample(flat[None].clone(), [seq([0], [], **params.__dict__)], gen).token_ids[0]
    assert exact_probs(flat, params)[token] > 0
    assert sampler.draw_row(logits.numpy(), seq([0], [], **params.__dict__), gen) in range(10)
    assert sorted_sizes == [10]
