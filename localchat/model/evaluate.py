"""How well a loaded model predicts a text: perplexity, computed through our own forward pass.

The text runs in chunks over a private KV pool. A model running its GGUF's quantized weights gets chunks no
longer than its native path takes (NativeForward.max_tokens), so it is measured on that path (the one that
picks every generated token); a dense model runs its torch path in the engine's own step budget
(settings.DEFAULT_MAX_NUM_BATCHED_TOKENS), since each of its forward calls costs ~0.1 s of dispatch on a
2-core host whatever its length. Both see the same ids.
"""

from __future__ import annotations

import math

import torch

from kernels import build_metadata
from localchat import settings


@torch.inference_mode()
def perplexity(loaded, token_ids: list[int], *, block_size: int = 16, chunk: int | None = None) -> float:
    """exp(mean negative log-likelihood) of token_ids[1:] given what precedes each (the first is context)."""
    if len(token_ids) < 2:
        raise ValueError("perplexity needs at least two tokens")
    model = loaded.model
    native = getattr(model, "native", None)
    chunk = chunk or (native.max_tokens if native is not None else settings.DEFAULT_MAX_NUM_BATCHED_TOKENS)
    num_blocks = -(-len(token_ids) // block_size) + 1
    shape = model.kv_cache_shape(num_blocks, block_size)
    caches = [(torch.zeros(shape, dtype=loaded.dtype), torch.zeros(shape, dtype=loaded.dtype)) for _ in range(model.num_layers)]
    table = list(range(num_blocks))
    total, count = 0.0, 0
    for start in range(0, len(token_ids) - 1, chunk):
        ids = token_ids[start : start + chunk]
        end = start + len(ids)
        meta = build_metadata([table], [end], [len(ids)], block_size)
        logits = model(torch.tensor(ids), torch.arange(start, end), caches, meta, torch.arange(len(ids)))
        targets = token_ids[start + 1 : end + 1]
        logprobs = torch.log_softmax(logits[: len(targets)].float(), dim=-1)
        total -= float(logprobs.gather(1, torch.tensor(targets)[:, None]).sum())
        count += len(targets)
    return math.exp(total / count)
