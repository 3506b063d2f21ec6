"""Who runs in this step: continuous batching with chunked prefill and preemption by recompute.

Each step has a token budget (`max_num_batched_tokens`). Running sequences are served
first, in admission order: a decoding sequence takes one token, a sequence still in
prefill takes the next chunk of its prompt that fits. Then waiting sequences are admitted
first come, first served while the budget, `max_num_seqs` and the KV pool allow; their
cached prefix blocks are reused. A sequence whose prefill does not fit whole is given a
chunk now and the rest in later steps, so prefills and decodes share every step.

When a running sequence needs a block and the pool is empty, the most recently admitted
running sequence is preempted: its blocks are freed, and it goes back to the front of the
waiting queue to be recomputed (prompt and generated tokens alike) when room returns.
No new sequence is admitted in a step that preempted.

With a draft proposer (speculative.py), a decoding sequence may take 1 + k tokens: its
last token and k draft tokens: the proposer picks k for all decoding sequences at once,
by expected gain in a step of this size, within the budget and what `max_tokens` and the
longest sequence still allow; then the free blocks limit them (drafts never preempt anyone:
without room they are dropped). After the step it advances by 1 + the drafts accepted, and the blocks
that only rejected drafts needed go back to the pool.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..config import SchedulerConfig
from .kv_cache import BlockManager
from .speculative import NgramProposer
from .sequence import Sequence, SeqStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # drafts included
    draft_token_ids: list[int] = field(default_factory=list)  # unverified tokens after the last one
    num_accepted: int = 0  # drafts the verification accepted (set by the engine)

    @property
    def samples(self) -> bool:
        """True when this step computes the sequence's last known token, so a new one is drawn."""
        known = self.num_new_tokens - len(self.draft_token_ids)
        return self.seq.num_computed_tokens + known == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager, proposer: NgramProposer | None = None,
                 max_seq_len: int | None = None):
        self.config = config
        self.blocks = blocks
        self.proposer = proposer
        self.max_seq_len = max_seq_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and return its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SeqStatus.FINISHED
        if self.proposer is not None:
            self.proposer.forget(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        return out

    def _chunk(self, seq: Sequence, computed: int, budget: int) -> int:
        """Tokens to compute this step for a sequence with `computed` tokens already in the cache."""
        n = min(seq.num_tokens - computed, budget)
        cap = self.config.long_prefill_token_threshold
        return min(n, cap) if cap else n

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        planned = self._plan_drafts(budget)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._chunk(seq, seq.num_computed_tokens, budget)
            drafts = planned.get(seq.seq_id, [])[:budget - 1] if n == 1 else []
            if drafts and self.blocks.blocks_needed(seq, seq.num_tokens + len(drafts)) > self.blocks.num_free_blocks:
                drafts = []  # no room for drafts: decode one token, preempt no one for them
            n += len(drafts)
            target = seq.num_computed_tokens + n
            while self.blocks.blocks_needed(seq, target) > self.blocks.num_free_blocks:
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                self.blocks.grow(seq, target)
                out.scheduled.append(ScheduledSeq(seq, n, drafts))
                budget -= n
                i += 1
                continue
            break  # `seq` itself was preempted: everything after it already was
        return budget

    def _plan_drafts(self, budget: int) -> dict[int, list[int]]:
        """Drafts for the decoding sequences this step (seq_id -> tokens), as many as pay by the
        proposer's measure: each within the tokens it may still produce (a step emits up to
        drafts + 1), all within the budget left after the step's own rows."""
        if self.proposer is None:
            return {}
        if self.proposer.max_batch is not None and len(self.running) > self.proposer.max_batch:
            return {}  # --speculative-max-batch: no drafts in a batch this full
        candidates, rows = [], 0
        for seq in self.running:
            left = seq.num_tokens - seq.num_computed_tokens
            if left != 1:
                rows += self._chunk(seq, seq.num_computed_tokens, budget)
                continue
            rows += 1
            limit = budget - 1
            if seq.params.max_tokens is not None:
                limit = min(limit, seq.params.max_tokens - seq.num_output_tokens - 1)
            if self.max_seq_len is not None:
                limit = min(limit, self.max_seq_len - seq.num_tokens - 1)
            if limit > 0:
                candidates.append((seq, limit))
        if not candidates:
            return {}
        if len(self.running) < self.config.max_num_seqs:  # prompts about to start share the step
            for s in self.waiting:
                if rows >= budget:
                    break
                rows = min(rows + s.num_tokens - s.num_computed_tokens, budget)
        return self.proposer.plan(candidates, rows, budget - rows)

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            hits = self.blocks.match_prefix(seq)
            computed = len(hits) * self.blocks.block_size
            n = self._chunk(seq, computed, budget)
            if not self.blocks.can_admit(seq, hits, computed + n):
                break
            self.waiting.popleft()
            self.blocks.admit(seq, hits, computed + n)
            if seq.num_preemptions == 0:
                seq.num_cached_prompt_tokens = min(computed, seq.num_prompt_tokens)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        out.scheduled = [s for s in out.scheduled if s.seq is not seq]

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Advance computed-token counts and publish newly full blocks to the prefix cache. A
        sequence that verified drafts advances by its last token and the accepted drafts, and
        gives back the blocks only its rejected drafts needed (their slots hold stale K/V,
        overwritten when real tokens reach those positions)."""
        for s in out.scheduled:
            if s.draft_token_ids:
                s.seq.num_computed_tokens += 1 + s.num_accepted
                self.blocks.shrink(s.seq, s.seq.num_computed_tokens + 1)
                if self.proposer is not None:
                    self.proposer.observe(s.seq, len(s.draft_token_ids), s.num_accepted)
            else:
                s.seq.num_computed_tokens += s.num_new_tokens
            self.blocks.commit(s.seq)
