"""Beam search over forked sequences, scored as transformers' `generate(num_beams=W)` does.

Each live beam is an engine Sequence. A step keeps the W best continuations by cumulative
log-probability: a beam chosen k times is forked k-1 times (its blocks shared, nothing copied),
and a beam not chosen is freed, so the beams' common history stays stored once. Finished
hypotheses are ranked by score / generated_length ** length_penalty, with transformers' rules for
early stopping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from localchat.engine.outputs import CompletionOutput
from localchat.engine.sequence import Sequence


class SequenceHost(Protocol):
    """What beam search needs from the engine (localchat.engine.engine.Engine implements it)."""

    max_model_len: int
    eos_token_ids: set[int]

    def start_sequence(self, request) -> Sequence: ...

    def fork_sequence(self, parent: Sequence, request, index: int) -> Sequence: ...

    def finish_sequence(self, seq: Sequence, reason: str) -> None: ...

    def decode(self, token_ids: list[int]) -> str: ...


@dataclass
class Hypothesis:
    score: float  # length-penalized
    token_ids: list[int]
    cumulative_logprob: float
    finish_reason: str


class BeamSearch:
    def __init__(self, engine: SequenceHost, request) -> None:
        self.engine = engine
        self.request = request
        params = request.params
        self.width = params.beam_width
        self.length_penalty = params.length_penalty
        self.early_stopping = params.early_stopping
        self.prompt_len = len(request.prompt_token_ids)
        self.max_new = min(params.max_tokens, engine.max_model_len - self.prompt_len)
        self.eos = set(engine.eos_token_ids) | set(params.stop_token_ids)
        if params.ignore_eos:
            self.eos = set(params.stop_token_ids)
        root = engine.start_sequence(request)
        self.running: list[tuple[Sequence, float]] = [(root, 0.0)]
        self.finished: list[Hypothesis] = []
        self.pending: dict[int, torch.Tensor] = {}  # seq_id -> log-probs of its next token
        self.improvement_possible = True
        self.done = False
        self.steps = 0
        self._next_index = 1

    # ------------------------------------------------------------------ engine hooks
    def step(self, pairs: list[tuple[Sequence, int]], logits: torch.Tensor) -> None:
        """Collect the next-token log-probs of beams computed this engine step; once every live
        beam has them, advance the search by one token."""
        for seq, row in pairs:
            self.pending[seq.seq_id] = torch.log_softmax(logits[row].float(), dim=-1)
        if self.done or any(seq.seq_id not in self.pending for seq, _ in self.running):
            return
        self._advance()

    def abort(self) -> None:
        self.done = True
        for seq, _ in self.running:
            self.engine.finish_sequence(seq, "abort")
        self.running = []

    # ------------------------------------------------------------------ the search
    def _advance(self) -> None:
        width = self.width
        scores = torch.tensor([s for _, s in self.running], dtype=torch.float32)
        logprobs = torch.stack([self.pending.pop(seq.seq_id) for seq, _ in self.running])
        vocab = logprobs.shape[-1]
        total = (logprobs + scores[:, None]).reshape(-1)
        keep = max(2, 1 + len(self.eos)) * width
        top_scores, top_idx = torch.topk(total, k=min(keep, total.numel()))
        gen_len = self.steps + 1  # tokens generated after this step, the new one included
        at_max = gen_len >= self.max_new
        candidates = []
        for rank, (score, idx) in enumerate(zip(top_scores.tolist(), top_idx.tolist())):
            beam, token = divmod(idx, vocab)
            stops = at_max or token in self.eos
            candidates.append((rank, beam, token, score, stops))

        # Finished hypotheses: only stopping candidates among the top `width` count.
        full = len(self.finished) >= width and self.early_stopping is True
        if self.improvement_possible and not full:
            for rank, beam, token, score, stops in candidates:
                if stops and rank < width:
                    parent = self.running[beam][0]
                    self._add_hypothesis(
                        Hypothesis(
                            score=score / (gen_len**self.length_penalty),
                            token_ids=parent.output_token_ids + [token],
                            cumulative_logprob=score,
                            finish_reason="length" if token not in self.eos else "stop",
                        )
                    )

        # Live beams for the next step: the best `width` candidates that did not stop.
        live = [c for c in candidates if not c[4]][:width]
        self.steps += 1
        all_stopped = all(c[4] for c in candidates)
        if live:
            best_running = live[0][3]
            if self.early_stopping == "never" and self.length_penalty > 0.0:
                hyp_len = self.max_new
            else:
                hyp_len = self.steps
            if len(self.finished) >= width:
                worst = min(h.score for h in self.finished)
                self.improvement_possible = self.improvement_possible and best_running / (hyp_len**self.length_penalty) > worst
        full = len(self.finished) >= width and self.early_stopping is True
        if all_stopped or not live or not self.improvement_possible or full:
            self._finish()
            return
        self._reassign(live)

    def _add_hypothesis(self, hyp: Hypothesis) -> None:
        self.finished.append(hyp)
        self.finished.sort(key=lambda h: h.score, reverse=True)
        del self.finished[self.width :]

    def _reassign(self, live: list[tuple]) -> None:
        """Fork beams chosen more than once, free those not chosen, append the new tokens."""
        engine = self.engine
        chosen: dict[int, int] = {}
        for _, beam, _, _, _ in live:
            chosen[beam] = chosen.get(beam, 0) + 1
        # Forks first, while every parent still ends where the step began.
        available: dict[int, list[Sequence]] = {}
        for beam, (seq, _) in enumerate(self.running):
            count = chosen.get(beam, 0)
            if count == 0:
                engine.finish_sequence(seq, "pruned")
                continue
            children = []
            for _ in range(count - 1):
                children.append(engine.fork_sequence(seq, self.request, self._next_index))
                self._next_index += 1
            available[beam] = [seq] + children
        new_running: list[tuple[Sequence, float]] = []
        for _, beam, token, score, _ in live:  # best first, as transformers orders its beams
            seq = available[beam].pop()
            seq.append_token(token, score - seq.cumulative_logprob)
            new_running.append((seq, score))
        self.running = new_running

    def finish_now(self) -> None:
        """Stop where the search is (out of KV memory): live beams become hypotheses."""
        if self.done:
            return
        for seq, score in self.running:
            gen = max(1, seq.num_output_tokens)
            self._add_hypothesis(Hypothesis(score / (gen**self.length_penalty), seq.output_token_ids, score, "length"))
        self._finish()

    def _finish(self) -> None:
        self.done = True
        for seq, _ in self.running:
            self.engine.finish_sequence(seq, "pruned")
        self.running = []

    # ------------------------------------------------------------------ reporting
    def outputs(self, final: bool) -> list[CompletionOutput]:
        if final or self.done:
            source = [(h.token_ids, h.cumulative_logprob, h.finish_reason) for h in self.finished]
        else:
            source = [(seq.output_token_ids, score, None) for seq, score in self.running]
        outs = []
        for i, (ids, logprob, reason) in enumerate(source):
            outs.append(
                CompletionOutput(
                    index=i,
                    text=self.engine.decode(ids),
                    token_ids=list(ids),
                    finish_reason=reason if reason is not None else ("abort" if final and self.request.aborted else None),
                    cumulative_logprob=logprob,
                )
            )
        return outs
