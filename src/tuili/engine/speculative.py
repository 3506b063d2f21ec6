"""Speculative decoding with n-gram drafts (prompt lookup): draft, verify, adapt.

Drafting. The last `n` tokens of a sequence (n = `max_n` down to `min_n`) are looked up
among the earlier tokens of the same sequence, prompt and output alike; the tokens that
followed the most recent earlier occurrence are the draft, at most `k` of them. Each
sequence keeps an index of its n-grams, extended with the tokens added since the last
look-up, so a look-up costs O(new tokens), not O(length).

Verification. A sequence with drafts d_1..d_k is scheduled with k+1 new tokens: its last
token and the drafts, at consecutive positions. The runner computes them in one forward
pass as k+1 decode rows over the paged cache (row j sees the context up to its own
position, so causality comes from the context lengths alone) and samples every row with
the sequence's history extended by the drafts before it (penalties and min_tokens stay
exact). Draft j is accepted when the token drawn at row j-1 equals it; the first row whose
draw differs emits that draw and ends the step; when all k are accepted, row k's draw is a
bonus token. So a step emits 1 to k+1 tokens.

Why this is exact. Greedy: every emitted token is the argmax of the logits the model
gives for that position after the very tokens that precede it, as without speculation.
Sampled: an n-gram draft is a point mass q = delta(d). Rejection sampling accepts d with
probability min(1, p(d)/q(d)) = p(d) and on rejection draws from the residual
max(p - q, 0) renormalised, i.e. p with d removed. Drawing x ~ p and accepting iff x == d
does exactly that: P(accept) = p(d), and given rejection x is distributed as p restricted
to tokens other than d, renormalised. This coupled form draws one uniform per emitted
token, the same draws as without speculation: the runner rewinds a seeded sequence's
generator to just after its last emitted token, so a seed gives the same text with and
without drafts, whatever else is batched (test_speculative.py checks the distribution
and the seeds).

KV and blocks. Rejected drafts' K/V were written into slots past the sequence's computed
length; they are overwritten when real tokens reach those positions. The scheduler
advances `num_computed_tokens` by 1 + accepted only, frees the blocks that only rejected
drafts needed, and block hashes are built from `token_ids`, which never hold an
unverified token (kv_cache.BlockManager.commit caps at the tokens the sequence has).

Adaptation, per sequence. `k` starts at the maximum; a step that accepts every draft
raises it by one, a step that rejects one cuts it to accepted + 1. A step that accepts
nothing starts a back-off: the sequence does not draft for 1, 2, 4, ... up to 32 steps,
so a request whose drafts keep failing stops paying for them (a failed verification
costs extra rows in the step). Any accepted draft ends the back-off.

Adaptation, per batch. With more than `max_batch` sequences running no one drafts: a step
of many decode rows is no longer bound by reading the weights, so each verification row
costs nearly what a sequence's own row does, and at the acceptance rates seen (about 60%)
that loses (grounded workload at c=16: 0.86x with drafts for everyone; docs/BENCHMARKS.md).

Grammars. A sequence carrying a guide (structured output) is never drafted for: its masks
depend on the grammar state after each draft, and a wrong draft would have to be rolled
back in the guide. It decodes one token per step as before.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .sequence import Sequence

SPECULATIVE_METHODS = ("none", "ngram")
MAX_BACKOFF = 32


@dataclass
class DraftState:
    """One sequence's n-gram index and adaptive draft length."""

    k: int
    index: list[dict[tuple[int, ...], int]] = field(default_factory=list)  # per n: n-gram -> where its follower is
    indexed: int = 0  # positions whose n-grams ending there are in `index`
    misses: int = 0  # verifications in a row that accepted nothing
    skip: int = 0  # steps left without drafts


class NgramProposer:
    """Drafts from n-gram matches in a sequence's own tokens, with a per-sequence adaptive length."""

    def __init__(self, num_tokens: int, min_n: int = 1, max_n: int = 3, max_batch: int | None = None):
        if num_tokens < 1:
            raise ValueError(f"speculative_tokens: must be >= 1, got {num_tokens}")
        self.max_k = num_tokens
        self.max_batch = max_batch  # no drafts while more sequences than this run (None: no limit)
        self.min_n = min_n
        self.max_n = max_n
        self.states: dict[int, DraftState] = {}
        self.drafted_tokens = 0
        self.accepted_tokens = 0
        self.verify_steps = 0

    def propose(self, seq: Sequence, limit: int) -> list[int]:
        """Up to min(k, limit) draft tokens to follow `seq`'s last token (may be empty)."""
        if limit <= 0 or getattr(seq, "guide", None) is not None:
            return []
        st = self.states.get(seq.seq_id)
        if st is None:
            st = self.states[seq.seq_id] = DraftState(self.max_k, [{} for _ in range(self.max_n + 1)])
        if st.skip > 0:
            st.skip -= 1
            return []
        return self._lookup(seq.token_ids, st, min(st.k, limit))

    def _lookup(self, tokens: list[int], st: DraftState, k: int) -> list[int]:
        end = len(tokens) - 1  # index n-grams ending before the last token, then look the suffix up
        for p in range(st.indexed, end):
            for n in range(self.min_n, self.max_n + 1):
                if p + 1 >= n:
                    st.index[n][tuple(tokens[p + 1 - n: p + 1])] = p + 1
        st.indexed = max(st.indexed, end)
        for n in range(self.max_n, self.min_n - 1, -1):
            if len(tokens) < n:
                continue
            start = st.index[n].get(tuple(tokens[len(tokens) - n:]))
            if start is not None:
                return tokens[start: start + k]
        return []

    def observe(self, seq: Sequence, drafted: int, accepted: int) -> None:
        """Record a verification: adapt the sequence's draft length and back-off."""
        self.drafted_tokens += drafted
        self.accepted_tokens += accepted
        self.verify_steps += 1
        st = self.states.get(seq.seq_id)
        if st is None:
            return
        if accepted == drafted:
            st.k = min(self.max_k, max(st.k, drafted) + 1)
        else:
            st.k = max(1, accepted + 1)
        if accepted == 0:
            st.misses += 1
            st.skip = min(2 ** (st.misses - 1), MAX_BACKOFF)
        else:
            st.misses = 0

    def forget(self, seq: Sequence) -> None:
        self.states.pop(seq.seq_id, None)

    def stats(self) -> dict[str, int]:
        return {"spec_draft_tokens": self.drafted_tokens, "spec_accepted_tokens": self.accepted_tokens,
                "spec_verify_steps": self.verify_steps}


def num_accepted(drafts: list[int], sampled: list[int]) -> int:
    """How many drafts the verification accepts: the leading run where the token drawn at
    the row before each draft equals it (`sampled` has one more entry than `drafts`)."""
    a = 0
    while a < len(drafts) and sampled[a] == drafts[a]:
        a += 1
    return a


def build_proposer(method: str, num_tokens: int, max_batch: int | None = None) -> NgramProposer | None:
    if method in (None, "", "none"):
        return None
    if method == "ngram":
        return NgramProposer(num_tokens, max_batch=max_batch)
    raise ValueError(f"speculative: unknown method {method!r}; use one of {', '.join(SPECULATIVE_METHODS)}")
