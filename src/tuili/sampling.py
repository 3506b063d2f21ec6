"""Sampling parameters: plain data, validated on construction, no torch.

The server builds these from request bodies and the CLI from flags; the torch sampler that
consumes them lives in `tuili.engine.sampler`, so `import tuili` and the HTTP layer's
request models never pull in torch.

- `temperature == 0` means greedy.
- `n > 1` completions of a seeded request use seed, seed+1, ... so they differ.
- `guided` asks for constrained decoding (a JSON schema, a regex, a choice of strings or a
  grammar), `logit_bias` adds to chosen tokens' logits; both act in the sampler's one
  masking path (engine/guided.py). `compiled_grammar` is filled in by the engine when it
  compiles `guided` (before the request reaches the engine loop); it is opaque here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GUIDED_KINDS = ("json", "json_object", "regex", "choice", "grammar", "lark")


@dataclass(frozen=True)
class GuidedDecoding:
    """A constraint on a completion's text, plain data.

    kind: "json" (spec: a JSON schema object), "json_object" (any JSON object; spec None),
    "regex" (spec: a pattern), "choice" (spec: a list of strings), "grammar" (spec: Lark
    or GBNF text), "lark" (spec: Lark text the server built, e.g. for tool calls).
    field: the request field it came from, so a grammar that cannot compile is a 400
    naming that field."""

    kind: str
    spec: Any = None
    field: str = "structured_outputs"

    def __post_init__(self) -> None:
        if self.kind not in GUIDED_KINDS:
            raise ValueError(f"{self.field}: unknown constraint kind {self.kind!r}; one of {', '.join(GUIDED_KINDS)}")
        ok = {"json": isinstance(self.spec, dict),
              "json_object": self.spec is None,
              "regex": isinstance(self.spec, str) and bool(self.spec),
              "choice": isinstance(self.spec, list) and bool(self.spec) and all(isinstance(c, str) for c in self.spec),
              "grammar": isinstance(self.spec, str) and bool(self.spec.strip()),
              "lark": isinstance(self.spec, str) and bool(self.spec.strip())}[self.kind]
        if not ok:
            want = {"json": "a JSON schema object", "json_object": "nothing", "regex": "a non-empty pattern",
                    "choice": "a non-empty list of strings", "grammar": "non-empty grammar text",
                    "lark": "non-empty grammar text"}[self.kind]
            raise ValueError(f"{self.field}: must be {want}, got {type(self.spec).__name__}")


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs to return per token (0: only the sampled one)
    skip_special_tokens: bool = True
    guided: GuidedDecoding | None = None
    logit_bias: dict[int, float] | None = None  # token id -> bias added to its logit, in [-100, 100]
    # Hand out the residual stream after this many layers (0: the embeddings) at the prompt's
    # last token, with the request's first token (`RequestDelta.hidden`): the router's probe.
    hidden_layer: int | None = None
    # Set by the engine's grammar compiler (engine/guided.py); each sequence gets its own matcher from it.
    compiled_grammar: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"{name}: {why}, got {getattr(self, name)!r}")

        if not isinstance(self.n, int) or self.n < 1:
            bad("n", "must be an integer >= 1")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad("max_tokens", "must be an integer >= 1")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must not exceed max_tokens ({self.max_tokens})")
        if not 0.0 <= self.temperature <= 100.0:
            bad("temperature", "must be in [0, 100]")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad("top_k", "must be -1 (off) or a positive integer")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "must be in [0, 1]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", "must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 10.0:
            bad("repetition_penalty", "must be in (0, 10]")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", "must be an integer")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            bad("logprobs", "must be an integer in [0, 20]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative integers")
        if self.guided is not None and not isinstance(self.guided, GuidedDecoding):
            bad("guided", "must be a GuidedDecoding")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                bad("logit_bias", "must map token ids to numbers")
            for t, b in self.logit_bias.items():
                if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                    raise ValueError(f"logit_bias: keys must be token ids (integers >= 0), got {t!r}")
                if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100.0 <= b <= 100.0:
                    raise ValueError(f"logit_bias: the bias of token {t} must be a number in [-100, 100], got {b!r}")
            if not self.logit_bias:
                self.logit_bias = None
        if self.hidden_layer is not None and (isinstance(self.hidden_layer, bool)
                                              or not isinstance(self.hidden_layer, int) or self.hidden_layer < 0):
            bad("hidden_layer", "must be an integer >= 0 (layers of the model)")
        if self.guided is not None and self.ignore_eos:
            bad("ignore_eos", "cannot be combined with structured output (the grammar ends the text with EOS)")

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the compiled grammar (a native object); the receiving engine
        compiles it again from `guided` (cached by schema hash)."""
        state = dict(self.__dict__)
        state["compiled_grammar"] = None
        return state

    @property
    def constrained(self) -> bool:
        """Whether the sampler masks this request's rows (a grammar or a logit bias)."""
        return self.guided is not None or bool(self.logit_bias)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def child_seed(self, index: int) -> int | None:
        return None if self.seed is None else self.seed + index
