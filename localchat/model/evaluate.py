"""How well a loaded model predicts a text: perplexity, computed through our own forward pass.

The text runs in chunks of localchat.model.native.NATIVE_MAX_TOKENS tokens over a private KV pool, so a
model running its GGUF's quantized weights is measured on that native path (the one that picks every
generated token), and a dense model on its torch path; both see the same token ids.
"""

from __future__ import annotations

import math

import torch

from kernels import build_metadata
from localchat.model.native import NATIVE_MAX_TOKENS


@torch.inference_mode()
def perplexity(loaded, token_ids: list[int], *, block_size: int = 16, chunk: int = NATIVE_MAX_TOKENS) -> float:
    """exp(mean negative log-likelihood) of token_ids[1:] given what precedes each (the first is context)."""
    if len(token_ids) < 2:
        raise ValueError("perplexity needs at least two tokens")
    model = loaded.model
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
