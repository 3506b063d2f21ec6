"""Perplexity of a model on a fixed text, and agreement of a low-precision model with the full one.

The text is cut into windows of `window` tokens (no overlap; each window's first token
has no context and is not scored). Each window runs through the engine's own model and
paged KV cache in prefill chunks of `chunk` tokens, so a quantized KV cache is exercised
exactly as in serving: every chunk attends to the earlier chunks as stored in the cache.

In comparison mode a second engine with the full-precision settings (same dtype, no
weight quantization, KV in the model dtype) runs the same windows in lockstep, and each
chunk's logits are compared at once, so no logits are kept for the whole text:
top-1 agreement (share of positions where both argmaxes agree) and the mean and max
absolute logit difference.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from ..data import CORPUS
from .engine import Engine
from .kv_cache import cdiv

DEFAULT_TEXT = CORPUS


@dataclass
class EvalResult:
    tokens_scored: int
    perplexity: float
    seconds: float
    weight_bytes: int
    kv_bytes_per_token: int
    reference_perplexity: float | None = None
    top1_agreement: float | None = None
    logit_mean_abs_diff: float | None = None
    logit_max_abs_diff: float | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _window_logits(engine: Engine, ids: list[int], chunk: int):
    """Yields (start, logits [n, V] float32) for each prefill chunk of one window."""
    nblocks = cdiv(len(ids), engine.config.block_size)
    if nblocks > engine.blocks.num_blocks:
        raise ValueError(f"window: {len(ids)} tokens do not fit the KV pool of {engine.blocks.num_blocks} blocks")
    table = list(range(nblocks))  # the idle pool's blocks 0..n-1, in order
    for start in range(0, len(ids), chunk):
        yield start, engine.runner.chunk_logits(ids[start:start + chunk], start, table)


@torch.inference_mode()
def evaluate(engine: Engine, token_ids: list[int], window: int = 1024, chunk: int = 256,
             reference: Engine | None = None, progress: bool = True) -> EvalResult:
    """Scores every token after the first of each window; the engine must be idle (it uses
    the KV pool directly, from block 0)."""
    from tqdm import tqdm

    if window < 2 or chunk < 1:
        raise ValueError("window must be >= 2 and chunk >= 1")
    if len(token_ids) < 2:
        raise ValueError("text: fewer than 2 tokens to score")
    for e in (engine, reference):
        if e is not None:
            if e.has_unfinished_requests():
                raise RuntimeError("evaluate needs an idle engine")
            e.blocks.reset_prefix_cache()  # the blocks are about to be overwritten
    t0 = time.perf_counter()
    nll = ref_nll = 0.0
    scored = agree = 0
    abs_sum, abs_max = 0.0, 0.0
    windows = [token_ids[i:i + window] for i in range(0, len(token_ids), window)]
    windows = [w for w in windows if len(w) >= 2]
    bar = tqdm(total=sum(len(w) for w in windows), desc="perplexity", unit="tok", disable=not progress, leave=False)
    for ids in windows:
        target = torch.tensor(ids, dtype=torch.long, device=engine.device)
        ref_iter = _window_logits(reference, ids, chunk) if reference is not None else None
        for start, logits in _window_logits(engine, ids, chunk):
            n = logits.shape[0]
            # logits at position p predict token p+1; the window's last position predicts nothing here
            rows = slice(0, min(n, len(ids) - 1 - start))
            tgt = target[start + 1: start + 1 + rows.stop]
            logp = torch.log_softmax(logits[rows], dim=-1)
            nll -= logp.gather(1, tgt[:, None]).sum().item()
            scored += rows.stop
            if ref_iter is not None:
                _, ref_logits = next(ref_iter)
                ref_logp = torch.log_softmax(ref_logits[rows], dim=-1)
                ref_nll -= ref_logp.gather(1, tgt[:, None]).sum().item()
                agree += (logits[rows].argmax(-1) == ref_logits[rows].argmax(-1)).sum().item()
                diff = (logits[rows] - ref_logits[rows]).abs()
                abs_sum += diff.mean(-1).sum().item()
                abs_max = max(abs_max, diff.max().item())
            bar.update(n)
    bar.close()
    result = EvalResult(tokens_scored=scored, perplexity=math.exp(nll / scored),
                        seconds=round(time.perf_counter() - t0, 2), weight_bytes=engine.model.weight_bytes(),
                        kv_bytes_per_token=engine.kv_bytes_per_block // engine.config.block_size)
    if reference is not None:
        result.reference_perplexity = math.exp(ref_nll / scored)
        result.top1_agreement = agree / scored
        result.logit_mean_abs_diff = abs_sum / scored
        result.logit_max_abs_diff = abs_max
    return result
