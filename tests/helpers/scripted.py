"""An engine whose model "writes" fixed texts: a real tiny engine (paged K/V, scheduler, sampler,
detokenizer all run) whose logits are overridden so each reply spells a chosen text, then ends.

A prompt whose last user message holds `[[payload N]]` gets payloads[N]; any other prompt gets the
tiny model's own (random) tokens. The forced token's logit towers over the rest, so any sampling
settings the page sends (temperature, top-p, penalties) pick it.
"""

from __future__ import annotations

import json
import re

import torch

MARKER = re.compile(r"\[\[payload (\d+)\]\]")


class ScriptedRunner:
    def __init__(self, engine, payloads: list[str]) -> None:
        self.engine = engine
        self.scripts = [engine.tokenizer.encode(p, add_special_tokens=False) + [engine.tokenizer.eos_token_id]
                        for p in payloads]
        self._execute = engine.runner.execute
        self._chosen: dict[int, list[int] | None] = {}
        engine.runner.execute = self.execute

    def script_for(self, seq) -> list[int] | None:
        if seq.seq_id not in self._chosen:
            found = MARKER.findall(self.engine.tokenizer.decode(seq.prompt_token_ids))
            index = int(found[-1]) if found else None
            self._chosen[seq.seq_id] = self.scripts[index] if index is not None and index < len(self.scripts) else None
        return self._chosen[seq.seq_id]

    def execute(self, work, copies):
        logits = self._execute(work, copies).clone()  # the step's logits are an inference tensor
        completing = [w.seq for w in work if w.completes_sequence]
        for row, seq in enumerate(completing):
            script = self.script_for(seq)
            if script is None:
                continue
            at = min(seq.num_output_tokens, len(script) - 1)
            forced = torch.full_like(logits[row], -1e4)
            forced[script[at]] = 1e4
            logits[row] = forced
        return logits


def scripted_tiny_engine(payloads_json: str = "[]", **kwargs):
    """A tiny engine (helpers/tiny.py) that writes the given texts; a module-level factory, so an engine
    process can build it."""
    from helpers.tiny import tiny_engine

    engine = tiny_engine(**kwargs)
    engine.scripted = ScriptedRunner(engine, json.loads(payloads_json))
    return engine
