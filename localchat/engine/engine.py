"""The engine: requests in, one batched step at a time, text deltas out.

It knows nothing of conversations: a request is a token sequence (or chat messages, tokenized
with the model's template) plus sampling parameters. Everything runs on the caller's thread;
`localchat.engine.driver.EngineDriver` runs it on a background thread for the UI and the CLI.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass

import torch

from localchat import settings
from localchat.engine import detokenizer
from localchat.engine.block_manager import BlockManager
from localchat.engine.model_runner import ModelRunner, kv_bytes_per_block, num_blocks_for_budget
from localchat.engine.outputs import CompletionOutput, RequestOutput
from localchat.engine.requests import EngineInfo, Request, RequestError, RequestFactory
from localchat.engine.sampler import rows_finite, sample
from localchat.engine.sampling_params import SamplingParams
from localchat.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from localchat.engine.sequence import Sequence
from localchat.model import chat_template


@dataclass
class EngineConfig:
    block_size: int = settings.DEFAULT_BLOCK_SIZE
    kv_cache_gb: float | None = None  # default: settings.DEFAULT_CPU_KV_CACHE_GB on the CPU, a share of free memory on CUDA
    gpu_memory_fraction: float = settings.DEFAULT_GPU_MEMORY_FRACTION
    num_blocks: int | None = None  # overrides kv_cache_gb
    max_num_seqs: int = settings.DEFAULT_MAX_NUM_SEQS
    max_num_batched_tokens: int = settings.DEFAULT_MAX_NUM_BATCHED_TOKENS
    enable_prefix_cache: bool = True
    max_model_len: int | None = None  # default: the model's context length
    watermark: float = 0.01
    seed: int | None = None  # for unseeded sampled requests
    attention: str = "auto"  # paged-attention kernels: "auto" (the device's), "torch" or "triton" (kernels.ATTENTION_CHOICES)

    def __post_init__(self) -> None:
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {self.block_size!r}")
        if self.kv_cache_gb is not None and not self.kv_cache_gb > 0:
            raise ValueError(f"kv_cache_gb must be > 0, got {self.kv_cache_gb!r}")
        if not 0 < self.gpu_memory_fraction < 1:
            raise ValueError(f"gpu_memory_fraction must be in (0, 1), got {self.gpu_memory_fraction!r}")
        # Checked here, before a model is loaded (localchat/cli/common.py build_engine builds this first).
        for name, least in (("max_num_seqs", 1), ("max_num_batched_tokens", 1), ("num_blocks", 1), ("max_model_len", 2)):
            value = getattr(self, name)
            if value is None and name in ("num_blocks", "max_model_len"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def kv_pool_bytes(config: EngineConfig, hf_config, dtype: torch.dtype, device: str | torch.device) -> int | None:
    """Bytes of the KV pool an engine with `config` will allocate; None where it takes a share of the
    memory left after the weights (CUDA without kv_cache_gb), which fits by construction."""
    per_block = kv_bytes_per_block(hf_config, config.block_size, dtype)
    if config.num_blocks:
        return config.num_blocks * per_block
    if config.kv_cache_gb is not None:
        budget = config.kv_cache_gb * 2**30
    elif torch.device(device).type == "cuda":
        return None
    else:
        budget = settings.DEFAULT_CPU_KV_CACHE_GB * 2**30
    return num_blocks_for_budget(hf_config, config.block_size, dtype, budget) * per_block


class Engine:
    def __init__(
        self,
        model: torch.nn.Module,
        hf_config,
        tokenizer,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        config: EngineConfig | None = None,
        model_name: str = "",
        eos_token_ids: list[int] | None = None,
        weights: dict | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        self.model_name = model_name
        # Which weights run (the GGUF's own blocks or a dense dtype) and the bytes a decode step streams.
        self.weights = weights or {"weights": str(dtype).removeprefix("torch."), "weight_bytes_per_token": 0}
        self.hf_config = hf_config
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.device = torch.device(device)
        num_blocks = self.config.num_blocks or num_blocks_for_budget(
            hf_config, self.config.block_size, dtype, self._kv_budget_bytes()
        )
        # The scheduler owns the block manager from here on; the engine reads figures through it.
        self.scheduler = self._new_scheduler(num_blocks, prefix_cache=self.config.enable_prefix_cache)
        self.runner = ModelRunner(model, hf_config, num_blocks, self.config.block_size, dtype, self.device, self.config.attention)
        self.max_model_len = self.config.max_model_len or int(getattr(hf_config, "max_position_embeddings", 2048))
        check_context = getattr(model, "check_context", None)
        if check_context is not None:  # e.g. a sliding window shorter than this context (localchat/model/architectures.py)
            check_context(self.max_model_len)
        self.eos_token_ids = set(eos_token_ids) if eos_token_ids else _eos_ids(hf_config, tokenizer)
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self.request_factory = RequestFactory(self.info())
        self._generator = torch.Generator()
        if self.config.seed is not None:
            self._generator.manual_seed(self.config.seed)
        self.steps = 0

    def _new_scheduler(self, num_blocks: int, *, prefix_cache: bool) -> Scheduler:
        return Scheduler(
            BlockManager(num_blocks, self.config.block_size, watermark=self.config.watermark,
                         enable_prefix_cache=prefix_cache),
            SchedulerConfig(self.config.max_num_seqs, self.config.max_num_batched_tokens),
        )

    @property
    def block_manager(self) -> BlockManager:
        """The scheduler's block manager, for figures, snapshots and invariant checks (read it; don't drive it)."""
        return self.scheduler.block_manager

    def _kv_budget_bytes(self) -> float:
        if self.config.kv_cache_gb is not None:
            return self.config.kv_cache_gb * 2**30
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return free * self.config.gpu_memory_fraction
        return settings.DEFAULT_CPU_KV_CACHE_GB * 2**30

    @classmethod
    def from_loaded(cls, loaded, config: EngineConfig | None = None) -> "Engine":
        """The one way to build an engine on a loaded model (localchat.model.LoadedModel)."""
        config = config or EngineConfig()
        if config.max_model_len is None and getattr(loaded, "context_length", None):
            config = dataclasses.replace(config, max_model_len=loaded.context_length)  # the registry's context_length
        return cls(
            loaded.model,
            loaded.config,
            loaded.tokenizer,
            dtype=loaded.dtype,
            device=loaded.device,
            config=config,
            model_name=loaded.name,
            weights={"weights": getattr(loaded, "weights", str(loaded.dtype).removeprefix("torch.")),
                     "weight_bytes_per_token": getattr(loaded, "weight_bytes_per_token", 0),
                     "activations": getattr(loaded, "activations", "float32")},
            eos_token_ids=loaded.eos_token_ids,
        )

    @classmethod
    def from_pretrained(cls, name: str | None = None, *, dtype=None, device: str | None = None, config: EngineConfig | None = None) -> "Engine":
        from localchat.model import load_model

        return cls.from_loaded(load_model(name, dtype=dtype, device=device), config)

    # ------------------------------------------------------------------ requests
    def encode(self, text: str) -> list[int]:
        return chat_template.encode(self.tokenizer, text)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def info(self) -> EngineInfo:
        """What clients need to know: limits for validation, the tokenizer, the pool's size."""
        return EngineInfo(
            model_name=self.model_name,
            tokenizer=self.tokenizer,
            vocab_size=int(self.hf_config.vocab_size),
            max_model_len=self.max_model_len,
            num_blocks=self.block_manager.num_blocks,
            block_size=self.block_manager.block_size,
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
            kv_cache_bytes=self.runner.kv_cache_bytes,
            details=dict(self.weights),
        )

    def make_request(self, prompt: str | None = None, **kwargs) -> Request:
        """Validate and tokenize without touching engine state (see RequestFactory.make)."""
        return self.request_factory.make(prompt, **kwargs)

    def add(self, request: Request) -> str:
        if request.request_id in self.requests:
            raise RequestError(f"request id {request.request_id!r} is already in use")
        if request.fork_from is not None:
            return self._add_fork(request)
        self.requests[request.request_id] = request
        request.metrics.arrival_time = time.perf_counter()
        if request.params.is_beam_search:
            from localchat.engine.beam_search import BeamSearch

            request.beam = BeamSearch(self, request)
            return request.request_id
        self.start_sequence(request)
        return request.request_id

    def _add_fork(self, request: Request) -> str:
        source = self.requests.get(request.fork_from)  # type: ignore[arg-type]
        live = [s for s in source.seqs if not s.is_finished] if source is not None else []
        if not live or source.beam is not None:
            raise RequestError(
                f"request {request.fork_from!r} is not running: continue from its token ids instead "
                "(the prefix cache still holds them)"
            )
        parent = min(live, key=lambda s: s.index)
        request.prompt_token_ids = list(parent.token_ids) + request.prompt_token_ids
        if len(request.prompt_token_ids) >= self.max_model_len:
            raise RequestError(f"the forked prompt has {len(request.prompt_token_ids)} tokens; the context holds {self.max_model_len}")
        self.request_factory.check_fits(len(request.prompt_token_ids), request.params)
        request.metrics.num_prompt_tokens = len(request.prompt_token_ids)
        request.metrics.arrival_time = time.perf_counter()
        self.requests[request.request_id] = request
        child = self.new_sequence(request, index=0)
        self.scheduler.fork(parent, child)
        child.prefix_hit_tokens = child.num_computed
        return request.request_id

    def add_request(self, prompt: str | None = None, **kwargs) -> str:
        return self.add(self.make_request(prompt, **kwargs))

    # ------------------------------------------- sequences (also beam search's interface)
    def new_sequence(self, request: Request, index: int, token_ids: list[int] | None = None) -> Sequence:
        """A sequence of `request` (not yet scheduled); by default it starts from the prompt."""
        seq = Sequence(
            seq_id=next(self._seq_ids),
            request_id=request.request_id,
            prompt_token_ids=list(request.prompt_token_ids),
            params=request.params,
            index=index,
            token_ids=list(token_ids) if token_ids is not None else [],
        )
        if request.params.seed is not None:
            # Sample i uses seed + i, so n=1 with a seed equals a plain request with that seed.
            seq.generator = torch.Generator().manual_seed(request.params.seed + index)
        request.seqs.append(seq)
        return seq

    def start_sequence(self, request: Request) -> Sequence:
        """The request's first sequence, queued for its prompt's prefill."""
        seq = self.new_sequence(request, index=0)
        self.scheduler.add(seq)
        return seq

    def fork_sequence(self, parent: Sequence, request: Request, index: int) -> Sequence:
        """A child that shares all of the parent's blocks and continues from its tokens."""
        child = self.new_sequence(request, index, token_ids=parent.token_ids)
        child.logprobs = list(parent.logprobs)
        child.top_logprobs = list(parent.top_logprobs)
        child.cumulative_logprob = parent.cumulative_logprob
        child.first_token_time = parent.first_token_time
        self.scheduler.fork(parent, child)
        return child

    def finish_sequence(self, seq: Sequence, reason: str) -> None:
        """Stop one sequence now; its blocks are released (cached where they hold a full prefix)."""
        self.scheduler.finish(seq, reason)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; unknown or finished ids are ignored."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        request.aborted = True
        if request.beam is not None:
            request.beam.abort()
        for seq in request.seqs:
            self.scheduler.finish(seq, "abort")
        request.metrics.finished_time = time.perf_counter()
        return self._report(request, final=True)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward pass, sample, and report every request that changed.

        A fault in the forward pass (a kernel error, out of memory for activations) or in sampling
        fails only the requests it was serving: they end with `error` set and their blocks freed
        (nothing of the failed step is committed to the prefix cache); the others go on.
        """
        sched = self.scheduler.schedule()
        touched: dict[str, Request] = {}
        for seq in sched.finished:
            request = self.requests[seq.request_id]
            if request.beam is not None:  # a beam that cannot grow ends the whole search
                request.beam.finish_now()
            touched[seq.request_id] = request
        if sched:
            try:
                logits = self.runner.execute(sched.work, sched.copies)
            except Exception as exc:  # noqa: BLE001 - contained to this step's requests
                self.fail_requests({w.seq.request_id for w in sched.work}, _fault("the forward pass", exc), touched)
            else:
                self.scheduler.commit(sched)
                self.steps += 1
                self._sample(sched, logits, touched)
        outputs = []
        for request in touched.values():
            if request.request_id not in self.requests:
                continue
            final = request.finished
            if final:
                request.metrics.finished_time = time.perf_counter()
                del self.requests[request.request_id]
            outputs.append(self._report(request, final))
        return outputs

    def fail_requests(self, request_ids, why: str, touched: dict[str, Request]) -> None:
        """End these requests now with an error; their blocks are released at once."""
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.error is not None:
                continue
            request.error = why
            if request.beam is not None:
                request.beam.abort()
            for seq in request.seqs:
                self.scheduler.finish(seq, "error")
            touched[request_id] = request

    def _sample(self, sched: SchedulerOutput, logits: torch.Tensor, touched: dict[str, Request]) -> None:
        completing = [w.seq for w in sched.work if w.completes_sequence]
        # A row of NaN or inf (overflow, a broken kernel) can't be sampled: fail its request alone.
        finite = rows_finite(logits) if completing else []
        bad = {seq.request_id for seq, ok in zip(completing, finite) if not ok}
        if bad:
            self.fail_requests(bad, "the model produced non-finite logits (NaN or inf) for this request", touched)
        try:
            self._sample_rows(sched, logits, touched, bad)
        except Exception as exc:  # noqa: BLE001 - contained to the requests being sampled
            live = {seq.request_id for seq in completing if seq.request_id in self.requests}
            self.fail_requests(live - bad, _fault("sampling", exc), touched)

    def _sample_rows(self, sched: SchedulerOutput, logits: torch.Tensor, touched: dict[str, Request], skip: set[str]) -> None:
        rows: list[int] = []
        seqs: list[Sequence] = []
        beam_rows: dict[str, list[tuple[Sequence, int]]] = {}
        row = 0
        for w in sched.work:
            if not w.completes_sequence:
                continue
            seq = w.seq
            if seq.request_id in skip:
                row += 1
                continue
            request = self.requests[seq.request_id]
            touched[request.request_id] = request
            if request.beam is not None:
                beam_rows.setdefault(request.request_id, []).append((seq, row))
            else:
                if request.params.n > 1 and not request.forked:
                    request.forked = True
                    for i in range(1, request.params.n):
                        seqs.append(self.fork_sequence(seq, request, i))
                        rows.append(row)
                seqs.append(seq)
                rows.append(row)
            row += 1
        for request_id, pairs in beam_rows.items():
            self.requests[request_id].beam.step(pairs, logits)
        if not seqs:
            return
        picked = logits[torch.tensor(rows)] if rows != list(range(logits.shape[0])) else logits
        result = sample(picked, seqs, self._generator)
        tops = result.top_logprobs or [None] * len(seqs)
        for seq, token, logprob, top in zip(seqs, result.token_ids, result.logprobs, tops):
            seq.append_token(token, logprob, top)
            self._check_stop(seq, token)

    def _check_stop(self, seq: Sequence, token: int) -> None:
        p = seq.params
        reason = None
        if (not p.ignore_eos and token in self.eos_token_ids) or token in p.stop_token_ids:
            reason = "stop"
        before = len(seq.text)
        detokenizer.detokenize_step(self.tokenizer, seq)
        cut_at_stop_string = False
        if reason is None and p.stop:
            at = detokenizer.find_stop(seq.text, p.stop, len(seq.text) - before)
            if at is not None:
                seq.text = seq.text[:at]
                reason = "stop"
                cut_at_stop_string = True
        if reason is None and seq.num_output_tokens >= p.max_tokens:
            reason = "length"
        if reason is None and seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            if not cut_at_stop_string:
                detokenizer.flush(self.tokenizer, seq)
            self.scheduler.finish(seq, reason)

    # ------------------------------------------------------------------- reports
    def _report(self, request: Request, final: bool) -> RequestOutput:
        if request.beam is not None:
            outs = request.beam.outputs(final)
        else:
            outs = []
            for seq in sorted(request.seqs, key=lambda s: s.index):
                shown = len(seq.text) if seq.is_finished else detokenizer.safe_emit_length(seq.text, seq.params.stop)
                shown = max(shown, seq.emitted_chars)
                out_ids = seq.output_token_ids
                outs.append(
                    CompletionOutput(
                        index=seq.index,
                        text=seq.text[:shown],
                        token_ids=list(out_ids),
                        finish_reason=seq.finish_reason,
                        cumulative_logprob=seq.cumulative_logprob,
                        logprobs=list(seq.logprobs[-len(out_ids):]) if seq.params.logprobs and out_ids else ([] if seq.params.logprobs else None),
                        top_logprobs=_last(seq.top_logprobs, len(out_ids)) if seq.params.top_logprobs else None,
                        delta_text=seq.text[seq.emitted_chars : shown],
                        delta_token_ids=list(out_ids[seq.emitted_tokens :]),
                    )
                )
                seq.emitted_chars = shown
                seq.emitted_tokens = len(out_ids)
        m = request.metrics
        firsts = [s.first_token_time for s in request.seqs if s.first_token_time is not None]
        if firsts:
            m.first_token_time = min(firsts)
        m.num_generated_tokens = sum(len(o.token_ids) for o in outs)
        m.prefix_hit_tokens = max((s.prefix_hit_tokens for s in request.seqs), default=0)
        return RequestOutput(request.request_id, list(request.prompt_token_ids), outs, final, m, error=request.error)

    # ------------------------------------------------------------- conveniences
    def generate(self, prompts: list[str] | None = None, params: SamplingParams | list[SamplingParams] | None = None, *, messages: list[list[dict]] | None = None, prompt_token_ids: list[list[int]] | None = None) -> list[RequestOutput]:
        """Run requests to completion (all submitted at once) and return their final outputs."""
        items: list[dict] = []
        for p in prompts or []:
            items.append({"prompt": p})
        for m in messages or []:
            items.append({"messages": m})
        for ids in prompt_token_ids or []:
            items.append({"prompt_token_ids": ids})
        plist = params if isinstance(params, list) else [params] * len(items)
        order = [self.add_request(**item, params=p) for item, p in zip(items, plist)]
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[r] for r in order]

    def warm_up(self) -> None:
        """Compute two short greedy replies on made-up text, then forget them.

        An engine's first reply pays one-time costs (first allocations, the dense prompt path's first GEMMs): a
        60-token prompt took 375 ms to its first token, and ~250 ms every time after (benchmarks/NOTES.md,
        session 14). The app's engine process pays them here, after it has said ready, instead of in the
        person's first message. The replies run on a block manager of their own over the same KV pool, so the
        engine's tables, counters, prefix cache, timeline and free-block order stay as built; the K/V they
        wrote is written again by whichever sequence is given those blocks next. Their lengths take both
        prompt paths: a chunk longer than the native step's limit (localchat/model/native.py) and a short one.
        """
        if self.requests:  # it forgets every request it knows of when it ends
            raise RuntimeError("warm_up runs on an engine with no requests, before it serves any")
        own = self.scheduler
        text = self.encode("The quick brown fox jumps over the lazy dog, and the dog sleeps on. " * 8)
        lengths = sorted({max(1, min(n, self.max_model_len - 2, len(text))) for n in WARM_UP_PROMPT_TOKENS})
        self.scheduler = self._new_scheduler(own.block_manager.num_blocks, prefix_cache=False)
        try:
            for n in lengths:
                self.generate(prompt_token_ids=[text[:n]], params=SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
        finally:
            self.scheduler = own
            self.requests.clear()
            self._seq_ids = itertools.count()
            self.request_factory = RequestFactory(self.info())
            self.steps = 0

    def memory(self) -> dict:
        """design.md's figures now, plus their peaks."""
        figs = self.block_manager.figures().as_dict()
        figs.update(self.block_manager.peaks())
        figs["kv_cache_bytes"] = self.runner.kv_cache_bytes
        return figs


# Prompt lengths of Engine.warm_up's replies: one past the native step's chunk limit, one within it.
WARM_UP_PROMPT_TOKENS = (48, 16)


def _fault(where: str, exc: BaseException) -> str:
    return f"the engine failed in {where} of this request's step ({type(exc).__name__}: {exc}); other requests were not affected"


def _last(items: list, count: int) -> list:
    return list(items[-count:]) if count else []


def _eos_ids(hf_config, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(hf_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(x) for x in source)
    return ids
