"""The batched sampler: one step's logits rows -> token ids (and logprobs).

Decisions:
- Processing order: penalties -> min_tokens masking -> logit_bias -> grammar mask ->
  temperature -> min_p -> top_k/top_p -> draw.
- `temperature == 0` means greedy (argmax of the penalised logits).
- Returned logprobs are those of the model's raw distribution (log_softmax of the logits
  before penalties, logit_bias, the grammar mask and temperature), as OpenAI and vLLM
  report them; for a constrained request that is the distribution the model wanted, not
  the masked one the token was drawn from.
- Constrained rows (a grammar: `SampleRequest.guide`, or a `logit_bias`) are masked in
  one batched pass over those rows only; a batch without them keeps the plain path (no
  copy of the logits). The sampler advances each guide by the token it draws. While
  `min_tokens` is not reached EOS stays banned, except once the grammar is complete
  (then EOS is the only token it allows, and the grammar wins).
- A request with a `seed` owns a torch.Generator; its draws depend only on that generator
  and its own logits row, so the same seed gives the same text whatever else is batched.
  A draw inverts the row's cumulative distribution at one uniform U: the first token whose
  cumulative probability exceeds U times the row's total. One random number per row keeps
  sampling cheap next to the model step (a draw per vocabulary entry cost more than the
  step's attention at batch 32).
- `n > 1` completions of a seeded request use seed, seed+1, ... so they differ.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence as Seq

import torch

from ..model.kernels import cpu_kernels
from ..sampling import SamplingParams
from .guided import Guide, GuidedStats, MaskBuilder


def greedy_ids(logits: torch.Tensor) -> torch.Tensor:
    """Each row's first maximal index (a NaN counts as the largest), as
    `logits.max(dim=-1).indices`: the CPU kernel's `argmax_rows` where it is built (torch's
    reduction took about 1 ms of a 26 ms decode step at batch 32 on 2 cores), else torch's
    max (the first maximal index, as argmax, at half argmax's cost on a CPU)."""
    if logits.device.type == "cpu" and logits.dtype is torch.float32 and logits.dim() == 2 and logits.shape[1]:
        ext = cpu_kernels()
        if ext is not None:
            return ext.argmax_rows(logits)
    return logits.max(dim=-1).indices


@dataclass
class SampleRequest:
    """One row of the batch to sample: its parameters, history and random state."""

    params: SamplingParams
    prompt_token_ids: Seq[int]
    output_token_ids: Seq[int]
    generator: torch.Generator | None = None
    eos_token_ids: Seq[int] = field(default_factory=tuple)
    guide: Guide | None = None  # the sequence's grammar state (engine/guided.py), None when free


@dataclass
class SampleResult:
    token_ids: list[int]
    # Per row: (logprob of the chosen token, [(token id, logprob) of the top k]) or None.
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


class Sampler:
    def __init__(self, device: torch.device, seed: int | None = None):
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed if seed is not None else torch.seed() % (2**63))
        self.masks = MaskBuilder()
        self.guided_stats = GuidedStats()

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, rows: Seq[SampleRequest]) -> SampleResult:
        """logits: [N, V] float32, one row per request in `rows`."""
        raw = logits
        if any(self._edits(r) for r in rows):  # penalties and masks edit a copy; logprobs use `raw`
            logits = logits.clone()
            self._apply_penalties(logits, rows)
            self._mask_early_stop(logits, rows)
            self._constrain(logits, rows)
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        token_list = [0] * len(rows)
        if greedy:
            picked = logits if len(greedy) == len(rows) else logits[torch.tensor(greedy, device=logits.device)]
            for i, t in zip(greedy, greedy_ids(picked).tolist()):
                token_list[i] = t
        if sampled:
            part = logits if len(sampled) == len(rows) else logits[torch.tensor(sampled, device=logits.device)]
            sub = [rows[i] for i in sampled]
            for i, t in zip(sampled, self._draw(self._probs(part, sub), sub).tolist()):
                token_list[i] = t
        self._advance_guides(rows, token_list)
        return SampleResult(token_list, self._logprobs(raw, rows, token_list))

    @staticmethod
    def _edits(r: SampleRequest) -> bool:
        p = r.params
        return (p.repetition_penalty != 1.0 or bool(p.presence_penalty or p.frequency_penalty)
                or len(r.output_token_ids) < p.min_tokens or r.guide is not None or bool(p.logit_bias))

    def _constrain(self, logits: torch.Tensor, rows: Seq[SampleRequest]) -> None:
        """logit_bias, then the grammar masks of the guided rows, in one batched fill."""
        vocab = logits.shape[1]
        for i, r in enumerate(rows):
            bias = r.params.logit_bias
            if bias:
                ids = torch.tensor([t for t in bias if t < vocab], dtype=torch.long, device=logits.device)
                vals = torch.tensor([b for t, b in bias.items() if t < vocab], dtype=logits.dtype,
                                    device=logits.device)
                logits[i].index_add_(0, ids, vals)
        guided = [i for i, r in enumerate(rows) if r.guide is not None]
        if not guided:
            return
        start = time.perf_counter()
        guides = [rows[i].guide for i in guided]
        drafts = [rows[i].output_token_ids[g.num_tokens:] for i, g in zip(guided, guides)]
        allowed = self.masks.masks(guides, vocab, drafts if any(drafts) else None).to(logits.device)
        if len(guided) == len(rows):
            logits.masked_fill_(~allowed, float("-inf"))
        else:
            idx = torch.tensor(guided, device=logits.device)
            logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))
        s = self.guided_stats
        s.steps += 1
        s.rows += len(guided)
        s.last_step_seconds = time.perf_counter() - start
        s.seconds += s.last_step_seconds

    def _advance_guides(self, rows: Seq[SampleRequest], tokens: list[int]) -> None:
        """Each guide accepts the tokens its sequence emits this step: the drawn token, or
        with draft rows (row j follows j drafts) the verification's output: the drawn tokens
        while each equals the next draft, then one more (speculative.num_accepted's rule)."""
        start = time.perf_counter()
        groups: dict[int, list[tuple[SampleRequest, int]]] = {}
        for r, t in zip(rows, tokens):
            if r.guide is not None:
                groups.setdefault(id(r.guide), []).append((r, t))
        moved = bool(groups)
        for items in groups.values():
            g = items[0][0].guide
            base = g.num_tokens
            items.sort(key=lambda item: len(item[0].output_token_ids))
            for j, (r, t) in enumerate(items):
                g.accept(t)
                if j + 1 == len(items) or items[j + 1][0].output_token_ids[base + j] != t:
                    break
        if moved:
            spent = time.perf_counter() - start
            self.guided_stats.seconds += spent
            self.guided_stats.last_step_seconds += spent

    def _apply_penalties(self, logits: torch.Tensor, rows: Seq[SampleRequest]) -> None:
        for i, r in enumerate(rows):
            p = r.params
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(list(r.prompt_token_ids) + list(r.output_token_ids),
                                    dtype=torch.long, device=logits.device).unique()
                vals = logits[i, seen]
                logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            if (p.presence_penalty or p.frequency_penalty) and len(r.output_token_ids):
                out = torch.tensor(list(r.output_token_ids), dtype=torch.long, device=logits.device)
                counts = torch.bincount(out, minlength=logits.shape[1])[: logits.shape[1]].to(logits.dtype)
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)

    def _mask_early_stop(self, logits: torch.Tensor, rows: Seq[SampleRequest]) -> None:
        for i, r in enumerate(rows):
            if len(r.output_token_ids) < r.params.min_tokens and not (r.guide is not None and r.guide.is_finished):
                banned = list(r.params.stop_token_ids)
                if not r.params.ignore_eos:
                    banned += list(r.eos_token_ids)
                if banned:
                    logits[i, banned] = float("-inf")

    def _probs(self, logits: torch.Tensor, rows: Seq[SampleRequest]) -> torch.Tensor:
        """Unnormalised probabilities after temperature, min_p, top_k and top_p (the draw
        divides by each row's total)."""
        temps = [r.params.temperature for r in rows]
        if any(t != 1.0 for t in temps):
            logits = logits / torch.tensor(temps, device=logits.device)[:, None]
        probs = torch.softmax(logits, dim=-1)
        min_p = [r.params.min_p for r in rows]
        if any(m > 0 for m in min_p):
            floor = probs.max(dim=-1, keepdim=True).values * torch.tensor(min_p, device=probs.device)[:, None]
            probs = probs.masked_fill(probs < floor, 0.0)
        top_k = [r.params.top_k for r in rows]
        top_p = [r.params.top_p for r in rows]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            probs = self._top_k_top_p(probs, top_k, top_p)
        return probs

    @staticmethod
    def _top_k_top_p(probs: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        vocab = probs.shape[-1]
        k = torch.tensor([kk if kk > 0 else vocab for kk in top_k], device=probs.device)
        ranks = torch.arange(vocab, device=probs.device)[None, :]
        drop = ranks >= k[:, None]
        p = torch.tensor(top_p, device=probs.device, dtype=probs.dtype)
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        # Keep the smallest prefix whose mass reaches top_p (mass before a token < top_p).
        before = sorted_p.cumsum(dim=-1) - sorted_p
        total = sorted_p.sum(dim=-1, keepdim=True)
        drop |= before >= p[:, None] * total
        drop[:, 0] = False
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        return torch.zeros_like(probs).scatter_(-1, order, sorted_p)

    def _draw(self, probs: torch.Tensor, rows: Seq[SampleRequest]) -> torch.Tensor:
        """Inverse CDF: the first token whose cumulative probability exceeds U * total, U uniform
        in [0, 1). Seeded rows draw their U from their own generator; the others share one draw
        from the sampler's generator. Tokens of probability 0 are never picked (the cumulative
        sum does not rise there, and the search wants a value strictly above the target)."""
        u = torch.empty(len(rows), 1, dtype=probs.dtype, device=probs.device)
        own = [i for i, r in enumerate(rows) if r.generator is not None]
        if len(own) < len(rows):
            u.uniform_(generator=self.generator)
        for i in own:
            u[i].uniform_(generator=rows[i].generator)
        cdf = probs.cumsum(dim=-1)
        picked = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
        return picked.squeeze(1).clamp_(max=probs.shape[-1] - 1)

    @staticmethod
    def _logprobs(raw: torch.Tensor, rows: Seq[SampleRequest], tokens: list[int]):
        wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        result: list[tuple[float, list[tuple[int, float]]] | None] = [None] * len(rows)
        if not wanted:
            return result
        idx = torch.tensor(wanted, device=raw.device)
        lp = torch.log_softmax(raw[idx], dim=-1)
        k = max(rows[i].params.logprobs for i in wanted)
        top_v, top_i = lp.topk(max(k, 1), dim=-1) if k else (None, None)
        chosen = lp[torch.arange(len(wanted), device=raw.device),
                    torch.tensor([tokens[i] for i in wanted], device=raw.device)].tolist()
        for j, i in enumerate(wanted):
            n = rows[i].params.logprobs
            top = list(zip(top_i[j, :n].tolist(), top_v[j, :n].tolist())) if n else []
            result[i] = (chosen[j], top)
        return result
