"""Structured output: grammars compiled once per schema, one matcher per sequence, token masks.

A request that carries a constraint (`SamplingParams.guided`: a JSON schema, any JSON
object, a regex, a choice of strings, a Lark/GBNF grammar, or the server's tool-call
grammar) is compiled by `GrammarCompiler.compile` in the caller's thread, before the
request reaches the engine loop, so a grammar the library cannot compile is an
InvalidRequestError (400) naming the request field it came from. Each sequence then owns a
`Guide` (its own matcher, copied from the compiled prototype), whose state advances by one
token per sampled token, and the sampler masks that sequence's logits row with it.

Decisions:
- Library: llguidance (Rust, no Python dependencies, a CPU wheel). xgrammar, vLLM's and
  SGLang's default, is not used: its x86-64 Linux wheel requires triton (about 1 GB, a GPU
  compiler), which a CPU-only install must not have to carry.
- Compiled grammars are cached by a hash of (kind, spec) (LRU, 256 entries); a sequence's
  matcher is a `deep_copy` of the cached prototype, so `n > 1` gives each completion its
  own state and a repeated schema costs no compile.
- JSON is compact (llguidance's `whitespace_flexible: false`): no free whitespace, so a
  model cannot spend its token budget on spaces and outputs stay bounded.
- The guide's state lives on the sequence and moves only when a token is sampled, so it
  survives preemption (recompute refills the KV of tokens it already accepted) and prefix
  cache hits (which skip computing prompt KV, not sampling).
- When the grammar is complete, its mask allows only EOS; a matcher in an error state
  (it cannot happen through the mask; a defensive case) also allows only EOS, ending the
  sequence instead of sampling from an empty row.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence as Seq

import numpy as np
import torch

from ..sampling import GuidedDecoding, SamplingParams
from .outputs import InvalidRequestError

_JSON_OPTIONS = {"whitespace_flexible": False}


def grammar_text(g: GuidedDecoding) -> str:
    """llguidance's grammar definition for a constraint (not yet checked)."""
    import llguidance

    M = llguidance.LLMatcher
    if g.kind == "json":
        return M.grammar_from_json_schema(json.dumps(g.spec), defaults=_JSON_OPTIONS)
    if g.kind == "json_object":
        return M.grammar_from_json_schema(json.dumps({"type": "object"}), defaults=_JSON_OPTIONS)
    if g.kind == "regex":
        return M.grammar_from_regex(g.spec)
    if g.kind == "choice":
        return llguidance.grammar_from("choice", json.dumps(g.spec))
    if g.kind == "grammar":
        return llguidance.grammar_from("grammar", g.spec)  # Lark, or GBNF converted to Lark
    return M.grammar_from_lark(g.spec)


def grammar_key(g: GuidedDecoding) -> str:
    text = json.dumps([g.kind, g.spec], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


class Guide:
    """One sequence's grammar state (an llguidance matcher), used by the sampler and by
    speculative decoding. The interface promised to both:

    - `fill_bitmask(row)`: write the allowed next tokens into an int32 bitmask row (bit t
      of word t // 32 set when token t is allowed); `allowed_mask()` is the same as a bool
      tensor of the vocabulary's size.
    - `accept(token_id) -> bool`: advance by a sampled token (False: not allowed; the
      matcher is then in an error state and the mask allows only EOS).
    - `rollback(n)`: undo the last n accepted tokens (rejected draft tokens).
    - `valid_prefix(token_ids) -> int`: how many of the given draft tokens the grammar
      accepts, in order, from the current state, without changing it.
    - `is_finished`: the grammar is complete; only EOS may follow.
    - `num_tokens`: how many tokens it has accepted (the sequence's output length).

    The sampler masks rows whose output runs past `num_tokens` (a verification row after
    draft tokens) with the state after those tokens, and advances the guide only by the
    tokens the step emits.
    """

    __slots__ = ("matcher", "vocab_size", "eos_token_ids", "num_tokens")

    def __init__(self, matcher, vocab_size: int, eos_token_ids: Seq[int]):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.num_tokens = 0

    def fill_bitmask(self, row: torch.Tensor) -> None:
        """row: a contiguous int32 CPU tensor of (vocab_size + 31) // 32 words."""
        self.matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)
        if self.matcher.is_error():
            eos_only(row, self.eos_token_ids)

    def allowed_mask(self) -> torch.Tensor:
        row = torch.zeros(bitmask_words(self.vocab_size), dtype=torch.int32)
        self.fill_bitmask(row)
        return unpack_bitmask(row[None], self.vocab_size)[0]

    def accept(self, token_id: int) -> bool:
        self.num_tokens += 1
        return self.matcher.consume_token(token_id)

    def rollback(self, n: int) -> None:
        if n and not self.matcher.rollback(n):
            raise ValueError(f"cannot roll the grammar back by {n} tokens: {self.matcher.get_error()}")
        self.num_tokens -= n

    def fill_bitmask_after(self, row: torch.Tensor, draft: Seq[int]) -> None:
        """The mask after `draft` tokens (state unchanged afterwards); EOS only when the
        grammar refuses one of them (such a row is past the verification's first rejection)."""
        if not draft:
            self.fill_bitmask(row)
        elif self.valid_prefix(draft) < len(draft):
            eos_only(row, self.eos_token_ids)
        else:
            self.matcher.consume_tokens(list(draft))
            self.fill_bitmask(row)
            self.matcher.rollback(len(draft))

    def valid_prefix(self, token_ids: Seq[int]) -> int:
        return self.matcher.validate_tokens(list(token_ids))

    @property
    def is_finished(self) -> bool:
        return self.matcher.is_stopped()

    @property
    def is_error(self) -> bool:
        return self.matcher.is_error()


@dataclass
class CompiledGrammar:
    """A compiled constraint: a prototype matcher that is only ever copied, never advanced."""

    key: str
    kind: str
    matcher: Any
    vocab_size: int
    eos_token_ids: tuple[int, ...]

    def new_guide(self) -> Guide:
        return Guide(self.matcher.deep_copy(), self.vocab_size, self.eos_token_ids)


class GrammarCompiler:
    """Compiles constraints for one tokenizer, caching by schema hash (thread-safe).

    The llguidance tokenizer (about 0.5 s to build from a Hugging Face fast tokenizer) is
    made on the first constrained request, so servers that never see one never pay it."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Seq[int], capacity: int = 256):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.capacity = capacity
        self._ll = None
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        self.compile_seconds = 0.0

    def _ll_tokenizer(self):
        if self._ll is None:
            import llguidance.hf
            from transformers import PreTrainedTokenizerFast

            if self.tokenizer is None or not isinstance(self.tokenizer, PreTrainedTokenizerFast):
                raise InvalidRequestError("structured output needs a fast (Rust) Hugging Face tokenizer, "
                                          "which this model does not have")
            n_vocab = max(self.vocab_size, len(self.tokenizer))
            self._ll = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=n_vocab,
                                                    eos_token=list(self.eos_token_ids) or None)
        return self._ll

    def compile(self, g: GuidedDecoding) -> CompiledGrammar:
        key = grammar_key(g)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return hit
            ll = self._ll_tokenizer()
        start = time.perf_counter()
        compiled = CompiledGrammar(key, g.kind, self._matcher(g, ll), self.vocab_size, self.eos_token_ids)
        with self._lock:
            self.misses += 1
            self.compile_seconds += time.perf_counter() - start
            self._cache[key] = compiled
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return compiled

    @staticmethod
    def _matcher(g: GuidedDecoding, ll):
        import llguidance

        try:
            text = grammar_text(g)
            error = llguidance.LLMatcher.validate_grammar(text, ll)
        except (ValueError, TypeError, RecursionError, OverflowError) as e:
            error = str(e) or type(e).__name__
        if error:
            raise InvalidRequestError(f"{g.field}: cannot be compiled: {_first_line(error)}")
        matcher = llguidance.LLMatcher(ll, text, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"{g.field}: cannot be compiled: {_first_line(matcher.get_error())}")
        return matcher

    def prepare(self, params: SamplingParams) -> None:
        """Compile `params.guided` into `params.compiled_grammar` and check `logit_bias`
        against the vocabulary; InvalidRequestError names the field at fault."""
        if params.logit_bias:
            for t in params.logit_bias:
                if t >= self.vocab_size:
                    raise InvalidRequestError(f"logit_bias: token id {t} is not in this model's vocabulary "
                                              f"[0, {self.vocab_size})")
        if params.guided is not None and params.compiled_grammar is None:
            params.compiled_grammar = self.compile(params.guided)


def _first_line(message: str) -> str:
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    text = "; ".join(lines[:3])
    return text[:400]


# ---- masks, batched ------------------------------------------------------------
def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def eos_only(row: torch.Tensor, eos_token_ids: Seq[int]) -> None:
    row.zero_()
    for t in eos_token_ids:
        row[t // 32] |= (1 << (t % 32)) if t % 32 != 31 else -(1 << 31)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[G, words] int32 -> [G, vocab_size] bool (True: allowed). numpy's unpackbits runs in
    this thread: torch's bit ops over the same [G, words, 32] went through OpenMP and cost
    up to 60 ms a step on a busy 2-core machine, against well under 1 ms here."""
    raw = bitmask.numpy().view(np.uint8)  # little-endian words: byte b holds tokens 8b..8b+7
    bits = np.unpackbits(raw, axis=1, bitorder="little")[:, :vocab_size]
    return torch.from_numpy(bits.view(np.bool_))


class MaskBuilder:
    """Fills the masks of a step's constrained rows into one reused bitmask buffer; with
    several rows, llguidance computes them on its own threads (the GIL released)."""

    def __init__(self, parallel_from: int = 16):
        self.parallel_from = parallel_from
        self._buf: torch.Tensor | None = None
        self._executor = None

    def masks(self, guides: Seq[Guide], vocab_size: int, drafts: Seq[Seq[int]] | None = None) -> torch.Tensor:
        """[len(guides), vocab_size] bool: the tokens each guide allows next (after its
        row's draft tokens, when given)."""
        words = bitmask_words(vocab_size)
        if self._buf is None or self._buf.shape[0] < len(guides) or self._buf.shape[1] != words:
            self._buf = torch.zeros(max(len(guides), 8), words, dtype=torch.int32)
        buf = self._buf[: len(guides)]
        drafts = drafts or [()] * len(guides)
        if len(guides) >= self.parallel_from and not any(drafts):
            self._fill_parallel(guides, buf)
        else:
            for i, (g, d) in enumerate(zip(guides, drafts)):
                g.fill_bitmask_after(buf[i], d)
        return unpack_bitmask(buf, vocab_size)

    def _fill_parallel(self, guides: Seq[Guide], buf: torch.Tensor) -> None:
        if self._executor is None:
            import os

            import llguidance

            self._executor = llguidance.LLExecutor(num_threads=max(1, min(4, (os.cpu_count() or 2))))
        self._executor.unsafe_compute_mask_ptr([(g.matcher, i) for i, g in enumerate(guides)],
                                               buf.data_ptr(), buf.shape[1] * 4, buf.shape[0])
        for i, g in enumerate(guides):
            if g.matcher.is_error():
                eos_only(buf[i], g.eos_token_ids)


@dataclass
class GuidedStats:
    """Grammar work in the sampler: steps with constrained rows, rows, and seconds spent
    computing and applying masks and advancing matchers."""

    steps: int = 0
    rows: int = 0
    seconds: float = 0.0
    last_step_seconds: float = 0.0
