"""A sequence: one completion's tokens and progress through the engine.

A request with `n` completions owns `n` sequences that share its prompt. The scheduler
sees `num_tokens`, `num_computed_tokens` and `block_table`; the runner reads tokens;
the postprocessor appends sampled tokens, decides when a sequence finishes and hands out
what is new (postprocess.py).

A constrained request (`params.compiled_grammar`, compiled before the request reached the
engine) gives each of its sequences its own grammar state, `guide` (engine/guided.py),
None for free sequences. It advances only when a token is sampled, so it is unaffected
by preemption (recompute refills KV for tokens it has already accepted) and prefix hits.
"""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..sampling import SamplingParams
from .outputs import InvalidRequestError, TokenLogprob

_seq_ids = itertools.count()


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # which of the request's n completions
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of full blocks
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_preemptions: int = 0
    num_cached_prompt_tokens: int = 0
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)  # not yet handed out
    generator: torch.Generator | None = None
    first_token_time: float | None = None
    # Incremental detokenization state, and how much has been handed out in deltas.
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    sent_text: int = 0
    sent_tokens: int = 0
    sent_finish: bool = False
    guide: Any = None  # guided.Guide of a constrained sequence, None when free
    hidden: list[float] | None = None  # params.hidden_layer's state at the last prompt token, once computed

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        if self.params.guided is not None and self.guide is None:
            if self.params.compiled_grammar is None:
                raise InvalidRequestError("guided: the constraint was not compiled; submit it through AsyncEngine "
                                          "(or call GrammarCompiler.prepare on the params first)")
            self.guide = self.params.compiled_grammar.new_guide()
        self.prefix_offset = max(len(self.prompt_token_ids) - 5, 0)
        self.read_offset = len(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def append(self, token_id: int) -> None:
        self.token_ids.append(token_id)
