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

How many drafts, by expected gain. A draft row costs time and pays only if it is accepted,
so the length is chosen per step from two things the engine measures as it runs:
- a step's cost, fitted online as `a + b * rows` over its own decode steps (least squares,
  recent steps weighted most: `StepCost`). On a CPU at batch 1, `a` is reading the weights
  and `b` a row's multiply-adds: two rows cost a few percent more than one, six rows about
  1.5x; in a batch of 16 the step is mostly `b`.
- the chance that each draft is emitted: the first draft's acceptance rate for this
  sequence (its own recent verifications, pulled towards the rate of all sequences for the
  same n-gram length), times the rate at which a draft is accepted after the one before it
  was (all sequences, per position); scaled by how often the drafts taken so far landed
  against what was predicted for them (the drafts with the highest estimates are high
  partly by chance).
A step's drafts are then taken greedily, most likely first, while a draft's chance p of
being emitted beats what its row costs at the step's current rate: p / b > E / T, with E
the tokens the step is expected to emit (a row per sequence, prefill tokens counted as
rows of work) and T its cost. That bar only rises as drafts are taken, so a sequence whose
first draft could not clear it even at the best shared rate is not looked up that step. At batch 1 a sequence copying its prompt drafts up to
`speculative_tokens`, one that paraphrases drafts one or none; in a full batch only the
sequences whose drafts keep landing draft at all. A sequence left without drafts drifts
back towards the shared rates, so it tries again later.

Grammars. A sequence carrying a guide (structured output) is never drafted for: its masks
depend on the grammar state after each draft, and a wrong draft would have to be rolled
back in the guide. It decodes one token per step as before.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .sequence import Sequence

SPECULATIVE_METHODS = ("auto", "none", "ngram")
SEQ_DECAY = 0.7  # a sequence's first-draft counts, per verification: its last few count
IDLE_DECAY = 0.9  # and per step it could draft but does not: back towards the shared rates
SHARED_DECAY = 0.99  # the shared rates, per verification
PRIOR_WEIGHT = 1.0  # pseudo-verifications of the shared rate in a sequence's estimate


class Rate:
    """A decayed success rate with a prior: (hits + w * prior) / (tries + w)."""

    __slots__ = ("hits", "tries", "prior", "weight")

    def __init__(self, prior: float, weight: float = 2.0):
        self.hits = self.tries = 0.0
        self.prior, self.weight = prior, weight

    def add(self, hit: bool, decay: float) -> None:
        self.hits = self.hits * decay + hit
        self.tries = self.tries * decay + 1

    @property
    def value(self) -> float:
        return (self.hits + self.weight * self.prior) / (self.tries + self.weight)


class StepCost:
    """A decode step's seconds as `a + b * rows`, fitted to the engine's own steps by least
    squares with each older step weighted `decay` times less. Until the steps seen spread
    over several row counts, the slope is `prior_slope` times the intercept."""

    def __init__(self, decay: float = 0.97, prior_slope: float = 0.1):
        self.decay, self.prior_slope = decay, prior_slope
        self.w = self.wr = self.wrr = self.wt = self.wrt = 0.0

    def observe(self, rows: int, seconds: float) -> None:
        d = self.decay
        self.w = self.w * d + 1
        self.wr = self.wr * d + rows
        self.wrr = self.wrr * d + rows * rows
        self.wt = self.wt * d + seconds
        self.wrt = self.wrt * d + rows * seconds

    def line(self) -> tuple[float, float]:
        """(a, b): a step's fixed cost and its cost per row (any unit; only b / a matters)."""
        if self.w <= 0:
            return 1.0, self.prior_slope
        r, t = self.wr / self.w, self.wt / self.w
        var = self.wrr / self.w - r * r
        if t <= 0:
            return 1.0, self.prior_slope
        if var < 0.25:  # nearly one row count: no slope to read
            a = t / (1 + self.prior_slope * r)
            return a, self.prior_slope * a
        b = (self.wrt / self.w - r * t) / var
        b = min(max(b, 0.01 * t / max(r, 1.0)), t / max(r, 1.0))  # 0 < a, and b not below noise
        return t - b * r, b


@dataclass
class DraftState:
    """One sequence's n-gram index and the acceptance of its first drafts."""

    first: Rate
    index: list[dict[tuple[int, ...], int]] = field(default_factory=list)  # per n: n-gram -> where its follower is
    indexed: int = 0  # positions whose n-grams ending there are in `index`
    match: int = 0  # n of the match behind the last look-up


class NgramProposer:
    """Drafts from n-gram matches in a sequence's own tokens; how many, by expected gain."""

    def __init__(self, num_tokens: int, min_n: int = 1, max_n: int = 3, max_batch: int | None = None):
        if num_tokens < 1:
            raise ValueError(f"speculative_tokens: must be >= 1, got {num_tokens}")
        self.max_k = num_tokens
        self.max_batch = max_batch  # no drafts while more sequences than this run (None: no limit)
        self.min_n = min_n
        self.max_n = max_n
        self.states: dict[int, DraftState] = {}
        self.cost = StepCost()
        self.first = [Rate(0.5) for _ in range(max_n + 1)]  # per n-gram length: first drafts accepted
        self.next = [Rate(0.8) for _ in range(num_tokens)]  # per position >= 1: accepted after the one before
        # Calibration: drafts accepted over the chances predicted for them (decayed sums). The
        # drafts a step takes are those with the highest estimates, which are high partly by
        # chance, so taken drafts land less often than predicted; the chances are scaled by this.
        self.predicted = self.landed = 0.0
        self.pending: dict[int, float] = {}  # seq_id -> predicted accepted drafts of its verification
        self.drafted_tokens = 0
        self.accepted_tokens = 0
        self.verify_steps = 0

    def _state(self, seq: Sequence) -> DraftState:
        st = self.states.get(seq.seq_id)
        if st is None:
            st = self.states[seq.seq_id] = DraftState(Rate(0.0, 0.0), [{} for _ in range(self.max_n + 1)])
        return st

    def propose(self, seq: Sequence, limit: int) -> list[int]:
        """Up to min(speculative_tokens, limit) tokens that followed the longest match of the
        sequence's last tokens (may be empty); `plan` decides how many of them to verify."""
        if limit <= 0 or getattr(seq, "guide", None) is not None:
            return []
        return self._lookup(seq.token_ids, self._state(seq), min(self.max_k, limit))

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
                st.match = n
                return tokens[start: start + k]
        st.match = 0
        return []

    @property
    def calibration(self) -> float:
        return min((self.landed + 4.0) / (self.predicted + 4.0), 1.5)

    def emit_chances(self, seq: Sequence, num: int) -> list[float]:
        """The chance that each of `num` drafts from the sequence's last look-up is emitted."""
        st = self._state(seq)
        shared = self.first[st.match].value
        p = min(1.0, self.calibration * (st.first.hits + PRIOR_WEIGHT * shared) / (st.first.tries + PRIOR_WEIGHT))
        out = []
        for j in range(num):
            if j:
                p *= self.next[j].value
            out.append(p)
        return out

    def plan(self, candidates: list[tuple[Sequence, int]], base_rows: int, max_drafts: int) -> dict[int, list[int]]:
        """Drafts for this step: seq_id -> tokens, for the decoding sequences in `candidates`
        (each with the most drafts it may take), in a step of `base_rows` rows without drafts,
        at most `max_drafts` in all. Greedy by chance of emission (module docstring)."""
        self.pending.clear()  # drafts planned last step but dropped (no room) were never verified
        drafts: dict[int, list[int]] = {}
        offers = []  # (chance, seq_id, position)
        a, b = self.cost.line()
        # A draft is taken while p * cost > b * expected, and that bar only rises as drafts are
        # taken; so a sequence whose first draft could not clear it at the start, even at the best
        # shared rate, is not looked up (at batch 32 on a CPU most are not: its look-ups took
        # about 2% of a run), and drifts back towards the shared rates as if it had been.
        bar = b * base_rows / max(a + b * base_rows, 1e-30)
        best_shared = max(r.value for r in self.first[self.min_n:])
        for seq, limit in candidates:
            if limit > 0 and getattr(seq, "guide", None) is None:
                st = self._state(seq)
                bound = self.calibration * (st.first.hits + PRIOR_WEIGHT * best_shared) / (st.first.tries + PRIOR_WEIGHT)
                if bound <= bar:
                    st.first.hits *= IDLE_DECAY
                    st.first.tries *= IDLE_DECAY
                    continue
            toks = self.propose(seq, limit)
            if not toks:
                continue
            drafts[seq.seq_id] = toks
            offers += [(p, seq.seq_id, j) for j, p in enumerate(self.emit_chances(seq, len(toks)))]
        offers.sort(key=lambda o: -o[0])
        expected, cost = float(base_rows), a + b * base_rows
        taken: dict[int, int] = {}
        for p, sid, j in offers[:max(max_drafts, 0)]:
            if p * cost <= b * expected:
                break
            expected += p
            cost += b
            taken[sid] = j + 1
            self.pending[sid] = self.pending.get(sid, 0.0) + p
        for seq, _ in candidates:
            if seq.seq_id in drafts and seq.seq_id not in taken:
                st = self.states[seq.seq_id]
                st.first.hits *= IDLE_DECAY
                st.first.tries *= IDLE_DECAY
        return {sid: drafts[sid][:n] for sid, n in taken.items()}

    def observe(self, seq: Sequence, drafted: int, accepted: int) -> None:
        """Record a verification: the rates behind the chances of emission."""
        self.drafted_tokens += drafted
        self.accepted_tokens += accepted
        self.verify_steps += 1
        predicted = self.pending.pop(seq.seq_id, None)
        if predicted is not None:
            self.predicted = self.predicted * SHARED_DECAY + predicted
            self.landed = self.landed * SHARED_DECAY + accepted
        st = self.states.get(seq.seq_id)
        match = st.match if st is not None else self.max_n
        self.first[match].add(accepted > 0, SHARED_DECAY)
        if st is not None:
            st.first.add(accepted > 0, SEQ_DECAY)
        for j in range(1, min(drafted, accepted + 1)):
            self.next[j].add(j < accepted, SHARED_DECAY)

    def observe_step(self, rows: int, seconds: float) -> None:
        """Record a step of decode rows only (drafts included) and how long it took."""
        self.cost.observe(rows, seconds)

    def forget(self, seq: Sequence) -> None:
        self.states.pop(seq.seq_id, None)
        self.pending.pop(seq.seq_id, None)

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


def resolve_method(method: str, rows_invariant: bool) -> tuple[str, str]:
    """The method `speculative=auto` (the default) stands for, and why. Drafting changes
    nothing a client can see but the speed where a row's products do not depend on how many
    rows share the step (`model.quant.rows_invariant`: the AVX2 tile kernels): greedy
    text and seeded samples stay the same token for token, sampled text keeps its
    distribution, and the measured-gain rule keeps rows from being spent where drafts do
    not land. Elsewhere (float32 or bf16 on torch's matmul, AVX512-BF16 and AMX kernels
    that switch with the row count, int8 and int4 on VNNI or AMX, CUDA) verification rows
    may round differently from one-row steps, so auto does not draft; `ngram` drafts anyway."""
    if method != "auto":
        return method, "as configured"
    if rows_invariant:
        return "ngram", "auto: a row's products do not depend on the row count here, so drafts change no token"
    return "none", "auto: products here may round a row differently with the row count; --speculative ngram drafts anyway"


def build_proposer(method: str, num_tokens: int, max_batch: int | None = None) -> NgramProposer | None:
    if method in (None, "", "none"):
        return None
    if method == "ngram":
        return NgramProposer(num_tokens, max_batch=max_batch)
    raise ValueError(f"speculative: unknown method {method!r}; use one of {', '.join(SPECULATIVE_METHODS)}")
