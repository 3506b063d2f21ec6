"""One model's inference loop: `Engine.step()` = schedule -> run -> sample -> postprocess.

The engine is synchronous and single-threaded; `async_engine.py` drives it from a
background thread for the server, and `LLM` (llm.py) drives it for offline use.

Decisions:
- A request with `n` completions becomes `n` sequences sharing the prompt (the prefix
  cache lets later siblings reuse the first one's prompt blocks).
- The KV pool is sized from `kv_cache_memory` (or `num_kv_blocks`); a request that could
  never fit in the pool or the context window is refused at `add_request` with a
  ValueError naming both lengths, instead of waiting forever. A request without
  max_tokens stops ("length") at the context window or at the pool's size, whichever
  is smaller.
- Output token ids include a final EOS or stop token id; the text never does, and never
  includes a matched stop string.
- Prefix hashes are salted with a digest of the weights (not the model's display name,
  which differs between a path and a known name), its shape, dtype, KV dtype,
  quantization and block size; the disk tier's directory is named by the same salt plus
  the KV layout, so blocks left by a run with other settings are never used.
- `close()` saves the cached blocks to the disk tier (if any) and waits for its writes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field

import torch

from ..config import EngineConfig, parse_size, resolve_device, resolve_dtype
from ..model.kernels import cpu_kernels
from ..model.quant import parse_quantization
from ..model.registry import build_model
from ..model.loader import LoadedModel, load_model
from ..sampling import SampleRequest, Sampler, SamplingParams
from .detokenizer import find_stop, update_text, visible_text
from .kv_cache import BlockManager, cdiv
from .tiers import KVTiers, tier_snapshot
from .disk_tier import DiskTier
from .runner import ModelRunner, kv_bytes_per_block
from .scheduler import Scheduler
from .sequence import Sequence, TokenLogprob

log = logging.getLogger("tuili.engine")


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "abort" or None while running
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[TokenLogprob] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    arrival_time: float = 0.0
    first_token_time: float | None = None


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.monotonic)

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
        self.model_config = loaded.config
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.tokenizer = _load_tokenizer(loaded)
        mc = loaded.config
        self.max_model_len = min(cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.eos_token_ids = self._eos_ids(loaded)
        self.model = build_model(mc, self.dtype, self.device, max_positions=self.max_model_len,
                                 quantization=parse_quantization(cfg.quantization))
        self.model.load_weights(loaded.weights)
        if self.device.type == "cpu":
            cpu_kernels()  # build or load the attention kernel now, not in the middle of the first request
        self.kv_dtype = torch.int8 if cfg.kv_cache_dtype == "int8" else self.dtype
        self.kv_bytes_per_block = per_block = kv_bytes_per_block(self.model, cfg.block_size, self.kv_dtype)
        num_blocks = cfg.num_kv_blocks or parse_size(cfg.kv_cache_memory) // per_block
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory: {cfg.kv_cache_memory} holds no block of {per_block} bytes")
        salt = (f"{weights_digest(loaded.weights)}|{self.dtype}|kv={self.kv_dtype}"
                f"|q={cfg.quantization}|{mc}").encode()
        self.blocks = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching, salt)
        # The longest a sequence may grow: the context window, or the whole pool if smaller,
        # so that a sequence running alone can always finish.
        self.max_seq_len = min(self.max_model_len, num_blocks * cfg.block_size)
        self.scheduler = Scheduler(cfg.scheduler_config(), self.blocks)
        self.runner = ModelRunner(self.model, num_blocks, cfg.block_size, self.kv_dtype)
        self.tiers = self._build_tiers() if cfg.enable_prefix_caching else None
        self.sampler = Sampler(self.device, cfg.seed)
        self.requests: dict[str, Request] = {}
        self.last_step_tokens = 0  # tokens the last step computed (prefill chunks + decodes)
        log.info("engine ready: model=%s dtype=%s quantization=%s kv_dtype=%s device=%s weights=%.1fMB "
                 "kv_blocks=%d (%d tokens) max_model_len=%d", self.model_name, str(self.dtype).removeprefix("torch."),
                 cfg.quantization, str(self.kv_dtype).removeprefix("torch."), self.device,
                 self.model.weight_bytes() / 1e6, num_blocks, num_blocks * cfg.block_size, self.max_model_len)

    def _build_tiers(self) -> KVTiers | None:
        cfg, runner = self.config, self.runner
        nbytes = runner.block_nbytes
        disk = None
        if cfg.kv_disk_dir:
            fingerprint = hashlib.blake2b(self.blocks.root_hash + runner.kv_layout().encode(), digest_size=16).digest()
            disk = DiskTier(cfg.kv_disk_dir, parse_size(cfg.kv_disk_size), fingerprint, nbytes)
        tiers = KVTiers(runner.read_blocks, runner.write_blocks, nbytes, parse_size(cfg.kv_host_memory), disk)
        if not tiers.enabled:
            return None
        self.blocks.tiers = tiers
        self.blocks.on_evict = tiers.on_evict
        return tiers

    def close(self) -> None:
        """Save cached KV blocks to the disk tier and wait for its writes (no-op without one)."""
        if self.tiers is None:
            return
        bm = self.blocks
        in_use = [b for b in range(bm.num_blocks) if bm.ref_counts[b] > 0]
        order = list(bm.free_queue) + in_use  # least recently used first
        self.tiers.close([(b, bm.block_hash[b]) for b in order if bm.block_hash[b] is not None])
        bm.tiers, bm.on_evict, self.tiers = None, None, None

    # ---- requests ------------------------------------------------------------
    def encode(self, prompt: str, tokenizer=None) -> list[int]:
        tokenizer = tokenizer or self.tokenizer
        if tokenizer is None:
            raise ValueError("prompt: this model has no tokenizer; send token ids")
        return tokenizer(prompt).input_ids

    def prepare(self, prompt: str | list[int], params: SamplingParams, tokenizer=None) -> list[int]:
        """Tokenize and check a prompt without changing engine state (safe from another thread
        when given its own tokenizer). Raises ValueError naming the field at fault."""
        ids = self.encode(prompt, tokenizer) if isinstance(prompt, str) else list(prompt)
        self._check_prompt(ids, params)
        return ids

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> Request:
        if request_id in self.requests:
            raise ValueError(f"request_id: {request_id!r} is already running")
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
            self.scheduler.add(seq)
        self.requests[request_id] = req
        return req

    def _check_prompt(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ValueError("prompt: must not be empty")
        vocab = self.model_config.vocab_size
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt: token ids must be integers in [0, {vocab})")
        limit = self.max_model_len
        if len(ids) >= limit:
            raise ValueError(f"prompt: {len(ids)} tokens is too long; this model's context is {limit} tokens")
        if params.max_tokens is not None and len(ids) + params.max_tokens > limit:
            raise ValueError(f"max_tokens: the prompt has {len(ids)} tokens and max_tokens is {params.max_tokens}, "
                             f"together more than this model's context of {limit} tokens")
        total = len(ids) + (params.max_tokens or 1)
        if total > self.max_seq_len:
            raise ValueError(f"prompt: {len(ids)} tokens plus max_tokens need {cdiv(total, self.config.block_size)} "
                             f"KV blocks, but the pool has only {self.blocks.num_blocks}")

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
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        self.last_step_tokens = sum(s.num_new_tokens for s in sched.scheduled)
        if sched.is_empty:
            return []
        if self.tiers is not None:
            self.tiers.flush()  # blocks evicted while scheduling, before the step overwrites them
        logits, sampling = self.runner.run(sched.scheduled)
        self.scheduler.update_after_step(sched)
        touched: dict[str, Request] = {}
        if sampling:
            rows = [SampleRequest(s.seq.params, s.seq.prompt_token_ids, s.seq.output_token_ids,
                                  s.seq.generator, self.eos_token_ids) for s in sampling]
            result = self.sampler(logits, rows)
            now = time.monotonic()
            for s, token, lp in zip(sampling, result.token_ids, result.logprobs):
                self._append(s.seq, token, lp, now)
                touched[s.seq.request_id] = self.requests[s.seq.request_id]
        outputs = [self._output(req) for req in touched.values()]
        for out in outputs:
            if out.finished:
                del self.requests[out.request_id]
        return outputs

    def _append(self, seq: Sequence, token: int, lp, now: float) -> None:
        seq.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = now
        if lp is not None:
            seq.logprobs.append(TokenLogprob(token, lp[0], lp[1]))
        p = seq.params
        delta = update_text(self.tokenizer, seq, p.skip_special_tokens)
        n_out = seq.num_output_tokens
        reason, stop = None, None
        if n_out >= p.min_tokens:
            if token in self.eos_token_ids and not p.ignore_eos:
                reason = "stop"
            elif token in p.stop_token_ids:
                reason, stop = "stop", token
            elif p.stop and delta:
                hit = find_stop(seq.text, len(delta), p.stop)
                if hit is not None:
                    seq.text = seq.text[: hit[0]]
                    reason, stop = "stop", hit[1]
        if reason is None and ((p.max_tokens is not None and n_out >= p.max_tokens)
                               or seq.num_tokens >= self.max_seq_len):
            reason = "length"
        if reason is not None:
            if reason == "length":
                update_text(self.tokenizer, seq, p.skip_special_tokens, final=True)
            seq.finish_reason, seq.stop_reason = reason, stop
            self.scheduler.finish(seq)

    def _output(self, req: Request) -> RequestOutput:
        outs = [CompletionOutput(s.index, visible_text(s, s.params.stop), list(s.output_token_ids),
                                 s.finish_reason, s.stop_reason,
                                 list(s.logprobs) if s.params.logprobs is not None else None)
                for s in req.seqs]
        first = min((s.first_token_time for s in req.seqs if s.first_token_time), default=None)
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, req.finished,
                             req.seqs[0].num_cached_prompt_tokens, req.arrival_time, first)

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


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """A cheap fingerprint of the weights: names, shapes, dtypes and a strided sample of each."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(weights):
        t = weights[name]
        flat = t.detach().reshape(-1)
        sample = flat[:: max(flat.numel() // 256, 1)][:256].contiguous().cpu()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
    return h.hexdigest()


def _load_tokenizer(loaded: LoadedModel):
    folder = loaded.folder
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if folder is None or not any((folder / n).exists() for n in names):
        log.warning("model %s has no tokenizer files: only token-id prompts will work", loaded.name)
        return None
    # A plain fast tokenizer (tokenizer.json + tokenizer_config.json, chat template included)
    # loads without AutoTokenizer's import of model configs and modules: about 3 s less
    # start-up on a 2-core CPU. Other tokenizer classes keep AutoTokenizer's choice.
    config_path = folder / "tokenizer_config.json"
    tokenizer_class = json.loads(config_path.read_text()).get("tokenizer_class") if config_path.exists() else None
    if (folder / "tokenizer.json").exists() and tokenizer_class in _PLAIN_FAST_TOKENIZERS:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


_PLAIN_FAST_TOKENIZERS = {None, "PreTrainedTokenizerFast", "TokenizersBackend", "GPT2Tokenizer", "GPT2TokenizerFast"}
