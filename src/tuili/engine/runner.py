"""Builds a step's tensors from the scheduled sequences, runs the model, samples.

The runner owns the KV cache tensors (per layer, K and V of shape
`[num_blocks, block_size, num_kv_heads, head_dim]`, and for an int8 cache also a float32
scale per token and head, `[num_blocks, block_size, num_kv_heads]`, for each) and is the only part of the engine
that touches tensors (the sampler is its own). In the flat batch, single-token queries
(decodes) come first and share one batched attention call; prefill chunks follow. A
sequence verifying k draft tokens (speculative.py) takes k+1 decode rows, one per
position, each with the context length of its own position.

`read_blocks` / `write_blocks` move whole blocks between the pool and flat CPU byte
buffers for the KV tiers. They walk every tensor of every layer's tuple (K and V today;
quantized KV adds scale tensors), each with the block id as dim 0, so a block's buffer is
the concatenation of its rows in all of them, in a fixed order.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from ..device import huge_pages_wanted
from ..model import hugepages
from ..model.layers import AttentionMetadata, PrefillSpan
from .kv_cache import cdiv
from .sampler import SampleRequest, Sampler
from .scheduler import ScheduledSeq
from .sequence import Sequence
from .speculative import num_accepted


class CausalLM(Protocol):
    """What the runner needs of a model family (LlamaModel, Gemma3Model)."""

    cfg: Any
    device: torch.device

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list,
                 meta: AttentionMetadata) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


def kv_bytes_per_block(model: CausalLM, block_size: int, kv_dtype: torch.dtype) -> int:
    """Bytes of K and V for one block over all layers, scales included for an int8 cache."""
    cfg = model.cfg
    per_row = cfg.head_dim * torch.tensor([], dtype=kv_dtype).element_size()
    if kv_dtype is torch.int8:
        per_row += 4  # the float32 scale of each (token, kv head) row
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * per_row


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, kv_dtype: torch.dtype,
                 sampler: Sampler | None = None, eos_token_ids: list[int] | None = None):
        self.model = model
        self.sampler = sampler or Sampler(model.device)
        self.eos_token_ids = list(eos_token_ids or [])
        self.device = model.device
        self.block_size = block_size
        cfg = model.cfg
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)

        layout = [(shape, kv_dtype)] * 2 + ([(shape[:-1], torch.float32)] * 2 if kv_dtype is torch.int8 else [])
        # On the CPU the caches lie in one mapping that asks Linux for 2 MB pages
        # (model/hugepages.py): a decode step reads blocks placed anywhere in the pool, each a
        # TLB miss on 4 KB pages.
        arena = hugepages.arena_for(layout * cfg.num_layers) if huge_pages_wanted(self.device) else None

        def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            if arena is not None:
                return arena.empty(shape, dtype).zero_()
            return torch.zeros(shape, dtype=dtype, device=self.device)

        self.kv_caches = [tuple(zeros(s, d) for s, d in layout) for _ in range(cfg.num_layers)]

    # ---- whole blocks, for the KV tiers --------------------------------------
    def _tensors(self) -> list[torch.Tensor]:
        return [t for layer in self.kv_caches for t in layer]

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block's buffer (all layers, all KV tensors)."""
        return sum(t[0].numel() * t.element_size() for t in self._tensors())

    def kv_layout(self) -> str:
        """Shapes and dtypes of the KV tensors: part of the disk tier's fingerprint."""
        return ";".join(f"{tuple(t.shape[1:])}:{t.dtype}" for t in self._tensors())

    @torch.inference_mode()
    def read_blocks(self, blocks: list[int]) -> list[torch.Tensor]:
        """One flat uint8 CPU buffer per block (pinned when the pool is on an accelerator)."""
        idx = self._tensor(blocks)
        flat = torch.cat([t.index_select(0, idx).reshape(len(blocks), -1).view(torch.uint8)
                          for t in self._tensors()], dim=1)
        pin = self.device.type == "cuda"
        out = []
        for row in flat:
            buf = torch.empty(row.numel(), dtype=torch.uint8, pin_memory=pin)
            buf.copy_(row)
            out.append(buf)
        return out

    @torch.inference_mode()
    def write_blocks(self, blocks: list[int], buffers: list[torch.Tensor]) -> None:
        """Copy buffers made by `read_blocks` into the given blocks of the pool."""
        if not blocks:
            return
        idx = self._tensor(blocks)
        flat = torch.stack(buffers).to(self.device, non_blocking=True)
        offset = 0
        for t in self._tensors():
            n = t[0].numel() * t.element_size()
            part = flat[:, offset:offset + n].contiguous().view(t.dtype).reshape(len(blocks), *t.shape[1:])
            t.index_copy_(0, idx, part)
            offset += n

    @torch.inference_mode()
    def run(self, scheduled: list[ScheduledSeq]) -> list[tuple[Sequence, list[int], list[Any]]]:
        """Runs one step and samples: (sequence, token ids, logprobs or None each) for each
        sequence that samples this step (a prefill chunk short of the prompt's end does not).
        A sequence without drafts gets one token; one with drafts gets the accepted drafts and
        the token drawn after them (speculative.py), and its `num_accepted` is set."""
        logits, sampling = self._logits(scheduled)
        if not sampling:
            return []
        rows: list[SampleRequest] = []
        rewind: dict[int, torch.Tensor] = {}
        for s in sampling:
            seq = s.seq
            if not s.draft_token_ids:
                rows.append(self._sample_request(seq, seq.output_token_ids))
                continue
            if seq.generator is not None:
                rewind[seq.seq_id] = seq.generator.get_state()
            out = seq.output_token_ids
            rows += [self._sample_request(seq, out + s.draft_token_ids[:j]) for j in range(len(s.draft_token_ids) + 1)]
        result = self.sampler(logits, rows)
        sampled, i = [], 0
        for s in sampling:
            k = len(s.draft_token_ids)
            tokens = result.token_ids[i: i + k + 1]
            n = 1
            if k:
                s.num_accepted = num_accepted(s.draft_token_ids, tokens)
                n = s.num_accepted + 1
                state = rewind.get(s.seq.seq_id)
                if state is not None:  # one uniform per emitted token, as without drafts
                    s.seq.generator.set_state(state)
                    for _ in range(n):
                        torch.empty(1, dtype=logits.dtype, device=logits.device).uniform_(generator=s.seq.generator)
            sampled.append((s.seq, tokens[:n], result.logprobs[i: i + n]))
            i += k + 1
        return sampled

    def _sample_request(self, seq: Sequence, output_token_ids: list[int]) -> SampleRequest:
        return SampleRequest(seq.params, seq.prompt_token_ids, output_token_ids, seq.generator, self.eos_token_ids,
                             seq.guide)

    def _logits(self, scheduled: list[ScheduledSeq]) -> tuple[torch.Tensor, list[ScheduledSeq]]:
        # Decode rows first: single tokens, and a verification's last token plus drafts, one
        # row per position (row j's context ends at its own position: causal by length).
        decodes = [s for s in scheduled if s.num_new_tokens == 1 or s.draft_token_ids]
        prefills = [s for s in scheduled if s.num_new_tokens > 1 and not s.draft_token_ids]
        ordered = decodes + prefills
        input_ids, positions, slots = self._flat_inputs(ordered)
        meta = AttentionMetadata(slot_mapping=self._tensor(slots))
        if decodes:
            self._decode_meta(decodes, meta)
        start = sum(s.num_new_tokens for s in decodes)
        for s in prefills:
            ctx = s.seq.num_computed_tokens + s.num_new_tokens
            table = self._tensor(s.seq.block_table[: cdiv(ctx, self.block_size)])
            meta.prefills.append(PrefillSpan(start, s.num_new_tokens, ctx, table))
            start += s.num_new_tokens
        taps = self._taps(ordered, meta)
        hidden = self.model(self._tensor(input_ids), self._tensor(positions), self.kv_caches, meta)
        for seq, depth, row in taps:
            seq.hidden = meta.capture[depth][row].float().tolist()
        sampling, rows, offset = [], [], 0
        for s in ordered:
            if s.draft_token_ids:
                sampling.append(s)
                rows.extend(range(offset, offset + s.num_new_tokens))
            elif s.samples:
                sampling.append(s)
                rows.append(offset + s.num_new_tokens - 1)
            offset += s.num_new_tokens
        if not rows:
            return torch.empty(0, self.model.cfg.vocab_size, device=self.device), []
        return self.model.compute_logits(hidden[self._tensor(rows)]), sampling

    @staticmethod
    def _taps(ordered: list[ScheduledSeq], meta: AttentionMetadata) -> list[tuple[Sequence, int, int]]:
        """(sequence, depth, row) for each sequence that asked for a hidden state and whose
        prompt's last token is computed this step; asks the model for those depths."""
        taps, offset = [], 0
        for s in ordered:
            seq, depth = s.seq, s.seq.params.hidden_layer
            end = seq.num_computed_tokens + s.num_new_tokens
            if depth is not None and seq.hidden is None and seq.num_computed_tokens < seq.num_prompt_tokens <= end:
                taps.append((seq, depth, offset + seq.num_prompt_tokens - seq.num_computed_tokens - 1))
            offset += s.num_new_tokens
        if taps:
            meta.capture = {depth: None for _, depth, _ in taps}
        return taps

    @torch.inference_mode()
    def chunk_logits(self, token_ids: list[int], start: int, block_table: list[int]) -> torch.Tensor:
        """Logits at every position of one prefill chunk (positions start.., KV written to
        `block_table`), for scoring a text (evaluate.py) through the same model call as serving."""
        bs = self.block_size
        end = start + len(token_ids)
        slots = [block_table[p // bs] * bs + p % bs for p in range(start, end)]
        meta = AttentionMetadata(slot_mapping=self._tensor(slots))
        meta.prefills.append(PrefillSpan(0, len(token_ids), end, self._tensor(block_table[: cdiv(end, bs)])))
        hidden = self.model(self._tensor(token_ids), self._tensor(list(range(start, end))), self.kv_caches, meta)
        return self.model.compute_logits(hidden)

    def _flat_inputs(self, ordered: list[ScheduledSeq]) -> tuple[list[int], list[int], list[int]]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for s in ordered:
            seq, start = s.seq, s.seq.num_computed_tokens
            end = start + s.num_new_tokens
            input_ids.extend(seq.token_ids[start:end] if not s.draft_token_ids else
                             seq.token_ids[start:] + s.draft_token_ids)
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
        return input_ids, positions, slots

    def _decode_meta(self, decodes: list[ScheduledSeq], meta: AttentionMetadata) -> None:
        lens = [s.seq.num_computed_tokens + 1 + j for s in decodes for j in range(s.num_new_tokens)]
        width = cdiv(max(lens), self.block_size)
        tables = []
        for s in decodes:
            table = s.seq.block_table[:width] + [0] * (width - len(s.seq.block_table[:width]))
            tables += [table] * s.num_new_tokens
        meta.num_decodes = len(lens)
        meta.decode_block_tables = self._tensor(tables)
        meta.decode_context_lens = self._tensor(lens)
        meta.decode_max_context = max(lens)

    def _tensor(self, data) -> torch.Tensor:
        return torch.tensor(data, dtype=torch.long, device=self.device)
