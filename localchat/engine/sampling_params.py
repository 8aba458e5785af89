"""Per-request sampling parameters, validated on construction so bad values fail early and clearly."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from localchat import settings


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = settings.DEFAULT_MAX_TOKENS
    temperature: float = settings.DEFAULT_TEMPERATURE  # 0 means greedy
    top_p: float = settings.DEFAULT_TOP_P
    top_k: int = 0  # 0 (or -1) disables top-k
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    # OpenAI's definition: each generated token's logit drops by presence_penalty once it has
    # appeared in the output and by frequency_penalty for every time it has (localchat/engine/sampler.py).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0  # with logprobs: also the most likely alternatives at each generated position
    n: int = 1  # parallel samples forked from one prefilled prompt
    beam_width: int = 0  # > 1 selects beam search
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # as transformers: True, False or "never"

    def __post_init__(self) -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(f"invalid sampling parameter: {msg}")

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise bad(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not _finite(self.temperature) or self.temperature < 0:
            raise bad(f"temperature must be >= 0, got {self.temperature!r}")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            raise bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad(f"top_k must be an integer >= 0 (or -1 for off), got {self.top_k!r}")
        if not _finite(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not _finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _finite(value) or not -2 <= value <= 2:
                raise bad(f"{name} must be in [-2, 2], got {value!r}")
        most_top = settings.MAX_TOP_LOGPROBS
        if isinstance(self.top_logprobs, bool) or not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= most_top:
            raise bad(f"top_logprobs must be an integer in [0, {most_top}], got {self.top_logprobs!r}")
        if self.top_logprobs and not self.logprobs:
            raise bad("top_logprobs needs logprobs=True")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise bad(f"seed must be an integer, got {self.seed!r}")
        most = settings.MAX_SAMPLES
        if isinstance(self.n, bool) or not isinstance(self.n, int) or not 1 <= self.n <= most:
            raise bad(f"n must be an integer in [1, {most}], got {self.n!r}")
        if isinstance(self.beam_width, bool) or not isinstance(self.beam_width, int) or not 0 <= self.beam_width <= most:
            raise bad(f"beam_width must be an integer in [0, {most}], got {self.beam_width!r}")
        if self.beam_width > 1 and self.n > 1:
            raise bad("use either n (sampling) or beam_width (beam search), not both")
        if not _finite(self.length_penalty):
            raise bad(f"length_penalty must be finite, got {self.length_penalty!r}")
        if self.early_stopping not in (True, False, "never"):
            raise bad(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop strings must be non-empty strings")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def is_beam_search(self) -> bool:
        return self.beam_width > 1

    def with_(self, **changes) -> "SamplingParams":
        return replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict) -> "SamplingParams":
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
        return cls(**data)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
