"""Model "auto": picks the fast or the strong served model per request, cheaply and load-aware.

Decisions:
- A request that names a served model is never rerouted (reason `explicit`).
- For the router's name ("auto" by default), the classifier (tuili.router) scores the
  request from surface features; at or above the calibrated threshold it goes to the
  strong model (`classifier_strong`), else to the fast one (`classifier_fast`).
- Load: a request the classifier sends to the strong model goes to the fast one instead
  (`overflow`) when the strong model's estimated wait exceeds `max_wait_ms`. The
  estimate is the time to compute the work already in the strong engine:

      wait = pending_tokens x seconds_per_token

  where pending_tokens (engine stats) is every unfinished request's prompt tokens not
  yet prefilled plus the tokens it may still generate, counted up to 256 per sequence,
  including requests still in the engine's inbox; and seconds_per_token is the engine
  loop's moving average of step time divided by tokens computed in the step (batching
  included). Before the engine has timed a step, `default_ms_per_token` stands in. It
  is a drain-time estimate: pessimistic when answers stop early, and it ignores that a
  new request can join the running batch at once, which is why the limit is the
  operator's to set.
- Decisions are counted by reason in Prometheus (`tuili_router_decisions_total`).
- Nothing here imports torch or numpy: a decision is string scans plus a dot product.

The probe signal (tuili.router.probe, the default when its file matches the fast model):
the request starts on the fast model as if it had been sent there, asking for its hidden
state after a few layers at the prompt's last token; that comes with the first token, and
a dot product with the probe's weights scores it. Kept on the fast model, the request just
goes on (its time to first token is the fast model's own: nothing is computed twice); sent
to the strong model, the fast call is aborted, and the request waited for one fast prefill.
When the probe cannot run (the prompt does not fit the fast model, its engine refuses or
fails) the surface features decide, and the fallback is counted
(`tuili_router_probe_total{outcome="fallback"}`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol

from ..router.classifier import RouterClassifier
from ..router.features import conversation, extract

log = logging.getLogger("tuili.router")

REASONS = ("explicit", "classifier_fast", "classifier_strong", "overflow")


class StatsSource(Protocol):
    def stats(self) -> dict[str, Any]: ...


@dataclass
class Decision:
    model: str  # the served model that answers
    reason: str  # one of REASONS
    score: float | None = None  # the classifier's probability of "hard" (None when explicit)
    strong_wait_ms: float | None = None  # the estimate that was compared with max_wait_ms
    seconds: float = 0.0  # time the decision took
    signal: str | None = None  # "probe" or "features" (None when explicit)


class Router:
    def __init__(self, name: str, fast: str, strong: str, classifier: RouterClassifier,
                 engines: dict[str, StatsSource], max_wait_ms: float | None = None,
                 default_ms_per_token: float = 5.0, on_decision: Callable[[Decision], None] | None = None,
                 probe: RouterClassifier | None = None,
                 on_probe: Callable[[str], None] | None = None):
        if fast not in engines or strong not in engines:
            missing = fast if fast not in engines else strong
            raise ValueError(f"--router: {missing!r} is not a served model; served: {', '.join(engines)}")
        if name in engines:
            raise ValueError(f"--router-name: {name!r} is also the name of a served model")
        self.name, self.fast, self.strong = name, fast, strong
        self.classifier = classifier
        self.engines = engines
        self.max_wait_ms = max_wait_ms
        self.default_ms_per_token = default_ms_per_token
        self.on_decision = on_decision
        self.probe = probe  # a probe classifier (router/probe.py) fitted on the fast model, or None
        self.on_probe = on_probe  # called with "used" or "fallback"

    def estimated_wait_ms(self, model: str) -> float:
        s = self.engines[model].stats()
        spt = s.get("seconds_per_token")
        ms_per_token = self.default_ms_per_token if spt is None else spt * 1000.0
        return float(s.get("pending_tokens", 0)) * ms_per_token

    def route(self, model: str, prompt: str | None = None, messages: list | None = None,
              max_tokens: int | None = None) -> Decision:
        """The served model for a request naming `model`; the caller checks that explicit names exist."""
        start = time.perf_counter()
        if model != self.name:
            decision = Decision(model, "explicit")
        else:
            x = extract(conversation(prompt, messages), max_tokens)
            decision = self._decide(self.classifier, self.classifier.score(x), "features")
        return self._done(decision, start)

    async def route_async(self, model: str, prompt: str | None = None, messages: list | None = None,
                          max_tokens: int | None = None,
                          read_hidden: Callable[[], Awaitable[list[float]]] | None = None) -> Decision:
        """As `route`, by the probe when there is one. `read_hidden()` waits for the hidden state
        of the request already started on the fast model (serve/routes.py starts it with
        `probe_layer`); when the probe keeps the request there, that call goes on answering."""
        if model != self.name or self.probe is None or read_hidden is None:
            return self.route(model, prompt, messages, max_tokens)
        start = time.perf_counter()
        try:
            hidden = await read_hidden()
        except Exception as e:  # noqa: BLE001 - any failure of the probe: the features decide
            log.info("router probe not used (%s: %s); surface features decide", type(e).__name__, str(e)[:200])
            if self.on_probe is not None:
                self.on_probe("fallback")
            return self.route(model, prompt, messages, max_tokens)
        if self.on_probe is not None:
            self.on_probe("used")
        return self._done(self._decide(self.probe, self.probe.score(hidden), "probe"), start)

    @property
    def probe_layer(self) -> int | None:
        """The fast model's layer the probe reads, or None without a probe."""
        return None if self.probe is None else int(self.probe.info["layer"])

    def _decide(self, clf: RouterClassifier, score: float, signal: str) -> Decision:
        if not clf.is_hard(score):
            return Decision(self.fast, "classifier_fast", score, signal=signal)
        wait = self.estimated_wait_ms(self.strong) if self.max_wait_ms is not None else None
        if wait is not None and wait > self.max_wait_ms:
            return Decision(self.fast, "overflow", score, wait, signal=signal)
        return Decision(self.strong, "classifier_strong", score, wait, signal=signal)

    def _done(self, decision: Decision, start: float) -> Decision:
        decision.seconds = time.perf_counter() - start
        if self.on_decision is not None:
            self.on_decision(decision)
        return decision
