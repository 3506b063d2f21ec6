"""One model's inference loop: `Engine.step()` = schedule -> run (model + sampler) -> postprocess.

The engine is synchronous and single-threaded; `async_engine.py` drives it from a
background thread for the server, and `LLM` (llm.py) drives it for offline use, both
through `step()`, which returns deltas (outputs.py).

Decisions:
- A request with `n` completions becomes `n` sequences sharing the prompt (the prefix
  cache lets later siblings reuse the first one's prompt blocks).
- The KV pool is sized from `kv_cache_memory` (or `num_kv_blocks`); a request that could
  never fit in the pool or the context window is refused at `add_request` with an
  InvalidRequestError naming both lengths, instead of waiting forever. A request without
  max_tokens stops ("length") at the context window or at the pool's size, whichever
  is smaller.
- The prefix-hash salt and the KV tiers are set up in cache_setup.py, stop rules and
  deltas in postprocess.py, tokenizers in tokenizer.py.
- `speculative="ngram"` drafts tokens from n-gram matches and verifies them in the same
  step (speculative.py); greedy output is unchanged and sampled output keeps its
  distribution. The default, `auto`, drafts only where a row's products do not depend on
  the row count, so that not even a rounding changes (speculative.resolve_method).
  Drafted and accepted token counts are in `stats()`.
- `close()` saves the cached blocks to the disk tier (if any) and waits for its writes.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import EngineConfig, parse_quantization, parse_size
from ..device import resolve_device, resolve_dtype
from ..model.registry import build_model
from ..model.layers import attention_paths
from ..model.loader import LoadedModel, load_model
from ..model.quant import packing_plan, rows_invariant
from ..sampling import SamplingParams
from .cache_setup import build_tiers, prefix_salt, save_and_close
from .kv_cache import BlockManager, cdiv
from .outputs import InvalidRequestError, RequestDelta, RequestOutput
from .postprocess import Postprocessor, take_delta
from .runner import ModelRunner, kv_bytes_per_block
from .sampler import Sampler
from .scheduler import Scheduler
from .sequence import Sequence
from .speculative import build_proposer, resolve_method
from .tiers import tier_snapshot
from .tokenizer import load_tokenizer

log = logging.getLogger("tuili.engine")


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.monotonic)
    hidden_sent: bool = False  # params.hidden_layer's state has been handed out

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class Engine:
    def __init__(self, model: str | LoadedModel, config: EngineConfig | None = None, **options):
        self.config = config or EngineConfig(**options)
        cfg = self.config
        loaded = load_model(model) if isinstance(model, str) else model
        self.model_name = loaded.name
        self.model_folder = loaded.folder
        self.model_config = mc = loaded.config
        self.device = resolve_device(cfg.device)
        # packing_plan builds or loads the CPU kernels here, not in the middle of the first request
        self.dtype = resolve_dtype(cfg.dtype, self.device, packed_products=packing_plan(self.device)[0])
        self.tokenizer = load_tokenizer(loaded.folder, loaded.name)
        self.max_model_len = min(cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.eos_token_ids = self._eos_ids(loaded)
        self.model = build_model(mc, self.dtype, self.device, max_positions=self.max_model_len,
                                 quantization=parse_quantization(cfg.quantization))
        self.model.load_weights(loaded.weights)
        self.kv_dtype = torch.int8 if cfg.kv_cache_dtype == "int8" else self.dtype
        self.kv_bytes_per_block = per_block = kv_bytes_per_block(self.model, cfg.block_size, self.kv_dtype)
        num_blocks = cfg.num_kv_blocks or parse_size(cfg.kv_cache_memory) // per_block
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory: {cfg.kv_cache_memory} holds no block of {per_block} bytes")
        salt = prefix_salt(loaded.weights, self.dtype, self.kv_dtype, cfg.quantization, mc)
        self.blocks = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching, salt)
        # The longest a sequence may grow: the context window, or the whole pool if smaller,
        # so that a sequence running alone can always finish.
        self.max_seq_len = min(self.max_model_len, num_blocks * cfg.block_size)
        self.speculative, why = resolve_method(cfg.speculative, rows_invariant(self.model))
        self.proposer = build_proposer(self.speculative, cfg.speculative_tokens, cfg.speculative_max_batch)
        self.scheduler = Scheduler(cfg.scheduler_config(), self.blocks, self.proposer, self.max_seq_len)
        self.runner = ModelRunner(self.model, num_blocks, cfg.block_size, self.kv_dtype,
                                  Sampler(self.device, cfg.seed), self.eos_token_ids)
        self.tiers = build_tiers(cfg, self.runner, self.blocks) if cfg.enable_prefix_caching else None
        self.post = Postprocessor(self.tokenizer, self.eos_token_ids, self.max_seq_len)
        self.requests: dict[str, Request] = {}
        self.last_step_tokens = 0  # tokens the last step computed (prefill chunks + decodes)
        log.info("engine ready: model=%s dtype=%s quantization=%s kv_dtype=%s device=%s weights=%.1fMB "
                 "kv_blocks=%d (%d tokens) max_model_len=%d", self.model_name, str(self.dtype).removeprefix("torch."),
                 cfg.quantization, str(self.kv_dtype).removeprefix("torch."), self.device,
                 self.model.weight_bytes() / 1e6, num_blocks, num_blocks * cfg.block_size, self.max_model_len)
        log.info("kernel paths: %s", attention_paths(self.dtype, self.kv_dtype, self.device, mc.head_dim))
        log.info("speculative decoding: %s (%s)", self.speculative, why)

    def close(self) -> None:
        """Save cached KV blocks to the disk tier and wait for its writes (no-op without one)."""
        if self.tiers is not None:
            save_and_close(self.tiers, self.blocks)
            self.tiers = None

    # ---- requests ------------------------------------------------------------
    def encode(self, prompt: str, tokenizer=None) -> list[int]:
        tokenizer = tokenizer or self.tokenizer
        if tokenizer is None:
            raise InvalidRequestError("prompt: this model has no tokenizer; send token ids")
        return tokenizer(prompt).input_ids

    def prepare(self, prompt: str | list[int], params: SamplingParams, tokenizer=None) -> list[int]:
        """Tokenize and check a prompt without changing engine state (safe from another thread
        when given its own tokenizer). Raises InvalidRequestError naming the field at fault."""
        ids = self.encode(prompt, tokenizer) if isinstance(prompt, str) else list(prompt)
        self.check_prompt(ids, params)
        return ids

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> Request:
        if request_id in self.requests:
            raise InvalidRequestError(f"request_id: {request_id!r} is already running")
        text = prompt if isinstance(prompt, str) else None
        ids = self.prepare(prompt, params)
        req = Request(request_id, text, ids, params)
        for i in range(params.n):
            seq = Sequence(request_id, i, ids, params, arrival_time=req.arrival_time)
            seed = params.child_seed(i)
            if seed is not None:
                seq.generator = torch.Generator(device=self.device)
                seq.generator.manual_seed(seed)
            req.seqs.append(seq)
        for seq in req.seqs:  # only once every sequence is built: a failure above leaves no trace
            self.scheduler.add(seq)
        self.requests[request_id] = req
        return req

    def check_prompt(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise InvalidRequestError("prompt: must not be empty")
        layers = self.model_config.num_layers
        if params.hidden_layer is not None and params.hidden_layer > layers:
            raise InvalidRequestError(f"hidden_layer: this model has {layers} layers, got {params.hidden_layer}")
        vocab = self.model_config.vocab_size
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"prompt: token ids must be integers in [0, {vocab})")
        limit = self.max_model_len
        if len(ids) >= limit:
            raise InvalidRequestError(f"prompt: {len(ids)} tokens is too long; this model's context is {limit} tokens")
        if params.max_tokens is not None and len(ids) + params.max_tokens > limit:
            raise InvalidRequestError(f"max_tokens: the prompt has {len(ids)} tokens and max_tokens is "
                                      f"{params.max_tokens}, together more than this model's context of {limit} tokens")
        total = len(ids) + (params.max_tokens or 1)
        if total > self.max_seq_len:
            raise InvalidRequestError(f"prompt: {len(ids)} tokens plus max_tokens need "
                                      f"{cdiv(total, self.config.block_size)} KV blocks, but the pool has only "
                                      f"{self.blocks.num_blocks}")

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- the step ------------------------------------------------------------
    def step(self) -> list[RequestDelta]:
        """Schedule -> run the model and sample -> postprocess; one delta per request that moved."""
        sched = self.scheduler.schedule()
        self.last_step_tokens = sum(s.num_new_tokens for s in sched.scheduled)
        if sched.is_empty:
            return []
        if self.tiers is not None:
            self.tiers.flush()  # blocks evicted while scheduling, before the step overwrites them
        start = time.perf_counter()
        sampled = self.runner.run(sched.scheduled)
        if self.proposer is not None and all(s.num_new_tokens == 1 or s.draft_token_ids for s in sched.scheduled):
            self.proposer.observe_step(self.last_step_tokens, time.perf_counter() - start)
        self.scheduler.update_after_step(sched)
        now = time.monotonic()
        touched: dict[str, Request] = {}
        for seq, tokens, lps in sampled:
            for token, lp in zip(tokens, lps):  # several after accepted drafts; none past a stop
                if self.post.append(seq, token, lp, now):
                    self.scheduler.finish(seq)
                    break
            touched[seq.request_id] = self.requests[seq.request_id]
        deltas = [self._delta(req) for req in touched.values()]
        for d in deltas:
            if d.finished:
                del self.requests[d.request_id]
        return deltas

    def _delta(self, req: Request) -> RequestDelta:
        outs = [take_delta(s, s.finish_reason is not None) for s in req.seqs]
        hidden = None
        if req.seqs[0].hidden is not None and not req.hidden_sent:  # once, with the first token
            hidden, req.hidden_sent = req.seqs[0].hidden, True
        return RequestDelta(req.request_id, [o for o in outs if o.token_ids or o.text or o.finish_reason],
                            req.finished, len(req.prompt_token_ids), req.seqs[0].num_cached_prompt_tokens, hidden)

    def generate(self, requests: list[tuple[str, str | list[int], SamplingParams]],
                 on_finish: Callable[[RequestOutput], None] | None = None,
                 on_delta: Callable[[RequestDelta], None] | None = None) -> list[RequestOutput]:
        """Add requests (id, prompt, params), step until all finish; outputs in the given order.
        The one "add, step until done" loop of offline use (LLM, the CLI, benchmarks)."""
        outs: dict[str, RequestOutput] = {}
        for rid, prompt, params in requests:
            req = self.add_request(rid, prompt, params)
            outs[rid] = RequestOutput.empty(rid, req.prompt, req.prompt_token_ids, params.n, params.logprobs is not None)
        left = len(outs)
        while left:
            for d in self.step():
                out = outs.get(d.request_id)
                if out is None:
                    continue
                out.add(d)
                if on_delta is not None:
                    on_delta(d)
                if d.finished:
                    left -= 1
                    if on_finish is not None:
                        on_finish(out)
        return [outs[rid] for rid, _, _ in requests]

    # ---- introspection -------------------------------------------------------
    def stats(self) -> dict[str, int]:
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_blocks_used": self.blocks.num_used_blocks,
            "kv_blocks_free": self.blocks.num_free_blocks,
            "kv_blocks_total": self.blocks.num_blocks,
            "preemptions": self.scheduler.num_preemptions,
            "prefix_hit_tokens": self.blocks.prefix_hit_tokens,
            "prefix_query_tokens": self.blocks.prefix_query_tokens,
            "pending_tokens": self.pending_tokens(),
            "spec_draft_tokens": self.proposer.drafted_tokens if self.proposer else 0,
            "spec_accepted_tokens": self.proposer.accepted_tokens if self.proposer else 0,
            "spec_verify_steps": self.proposer.verify_steps if self.proposer else 0,
            **{f"prefix_hit_tokens_{t}": n for t, n in self.blocks.tier_hit_tokens.items()},
            **tier_snapshot(self.tiers),
        }

    def pending_tokens(self, decode_horizon: int = 256) -> int:
        """Tokens still to compute for the requests in the engine: prompt tokens not yet
        prefilled, plus tokens each sequence may still generate, counted up to
        `decode_horizon` (most answers end long before a large max_tokens, and an unset
        max_tokens would otherwise count the whole context). Used by the router's
        estimate of a model's wait."""
        total = 0
        for req in self.requests.values():
            for seq in req.seqs:
                if seq.is_finished:
                    continue
                limit = min(self.max_seq_len - seq.num_tokens, decode_horizon)
                if seq.params.max_tokens is not None:
                    limit = min(limit, seq.params.max_tokens - seq.num_output_tokens)
                total += max(seq.num_tokens - seq.num_computed_tokens, 0) + max(limit, 0)
        return total

    def _eos_ids(self, loaded: LoadedModel) -> list[int]:
        ids = set(loaded.config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)
