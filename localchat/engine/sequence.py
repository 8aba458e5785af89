"""One token sequence the engine computes: a prompt plus what has been generated from it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from localchat.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    # Index of this sequence among its request's outputs (n samples, beams).
    index: int = 0
    token_ids: list[int] = field(default_factory=list)
    # Tokens whose K/V is already in the cache; the rest of token_ids must still be computed.
    num_computed: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    logprobs: list[float] = field(default_factory=list)
    # With params.top_logprobs: per generated token, the most likely (token id, logprob) pairs.
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    generator: torch.Generator | None = None
    first_token_time: float | None = None
    # Text that the detokenizer has produced so far (stop strings already cut out).
    text: str = ""
    # Detokenizer state (incremental, in the manner of vLLM).
    prefix_offset: int = 0
    read_offset: int = 0
    emitted_chars: int = 0
    emitted_tokens: int = 0
    prefix_hit_tokens: int = 0

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < self.num_tokens - 1

    def append_token(self, token_id: int, logprob: float, top: list[tuple[int, float]] | None = None) -> None:
        self.token_ids.append(token_id)
        self.logprobs.append(logprob)
        if top is not None:
            self.top_logprobs.append(top)
        self.cumulative_logprob += logprob
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
