"""The background loop that HTTP requests join and leave: the engine's only door for the server.

One thread per model owns the `Engine` and runs `step()` whenever there is work. A call
(one HTTP request: one or more prompts, `n` completions each) is tokenized and validated
in the caller, with a tokenizer instance of its own (Hugging Face fast tokenizers must
not be shared across threads), then handed to the loop thread through a locked inbox.
Its deltas come back on ONE asyncio queue per call (`RequestStream`), tagged with the
prompt's index. Joining and leaving happen between steps, so concurrent calls share
batches.

Decisions:
- Engine request ids are made here, never taken from a client: no client can reach
  another's request by guessing or reusing an id.
- Abort lives in one place, `RequestStream.abort()`: a consumer that stops listening
  (a client disconnect, a cancelled task) calls it, and its KV blocks are freed at the
  next step boundary.
- An exception while adding a request fails that request only (InvalidRequestError for
  bad input, EngineError otherwise). An exception in a step fails the requests in flight
  and the loop serves on. If the loop itself dies, every waiting call gets EngineDeadError
  at once, and `is_alive` turns False (the server's /health then answers 503).
- `fail_all` ends every call in flight with a given error (the server's shutdown
  deadline); `shutdown` stops the loop and saves the disk tier.

`AsyncEngine.load` builds the engine inside the loop thread. Loading runs OpenMP parallel
regions, and the first one in a thread creates that thread's OpenMP team: a model loaded in
the main thread and stepped in the loop thread leaves two teams, more OpenMP threads than
cores, and libgomp then stops spinning between parallel regions. Each step of a small model
runs about 150 of them, and batch-1 decode was about 30% slower that way
(`docs/BENCHMARKS.md`). The server loads every model with it.

Structured output: `prepare` compiles a request's constraint (guided.py's cache, keyed by
schema hash) in the caller's thread, so a grammar the library cannot compile is an
InvalidRequestError naming its field and never reaches the engine loop.
"""
from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import threading
import time
from typing import Any, AsyncIterator, Callable

from ..sampling import GuidedDecoding, SamplingParams
from .engine import Engine
from .guided import GrammarCompiler
from .outputs import (EngineDeadError, EngineError, InvalidRequestError, QueueFullError, RequestDelta)
from .tokenizer import chat_prompt_ids, load_tokenizer, max_token_chars

log = logging.getLogger("tuili.engine")

_call_ids = itertools.count()


class RequestStream:
    """The deltas of one call's engine requests, as `(prompt index, RequestDelta)`, in order.

    Iterating ends when every prompt's request has finished; an error ends it with the
    exception. Leaving early, or `abort()`, aborts whatever has not finished."""

    def __init__(self, engine: AsyncEngine, ids: list[str]):
        self._engine = engine
        self.ids = ids
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._open = set(range(len(ids)))
        self.aborted = False

    def put(self, item: tuple[int, RequestDelta] | BaseException) -> None:  # any thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening any more
            pass

    def __aiter__(self) -> AsyncIterator[tuple[int, RequestDelta]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[tuple[int, RequestDelta]]:
        try:
            while self._open:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    self.abort()  # the call's other prompts end with it
                    raise item
                k, delta = item
                if delta.finished:
                    self._open.discard(k)
                yield k, delta
        finally:
            if self._open:
                self.abort()

    @property
    def finished(self) -> bool:
        return not self._open

    def abort(self) -> None:
        """Abort every request of this call that has not finished (idempotent)."""
        if self.aborted:
            return
        self.aborted = True
        self._engine._abort([self.ids[k] for k in sorted(self._open)])
        self._open.clear()


class AsyncEngine:
    def __init__(self, engine: Engine, max_queue: int = 1024, *, _thread: threading.Thread | None = None):
        self.engine = engine
        self.max_queue = max_queue
        self.model_name: str = engine.model_name
        self.max_model_len: int = engine.max_model_len
        self.tokenizer = load_tokenizer(engine.model_folder, engine.model_name) if engine.tokenizer else None
        self.max_token_chars = max_token_chars(self.tokenizer)
        self.grammars = GrammarCompiler(self.tokenizer, engine.model_config.vocab_size, engine.eos_token_ids)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._adds: list[tuple[str, list[int], SamplingParams]] = []
        self._aborts: list[str] = []
        self._routes: dict[str, tuple[RequestStream, int]] = {}  # engine request id -> (call, prompt index)
        self._stopping = False
        self._dead: BaseException | None = None
        self._stats = engine.stats()
        self.seconds_per_token: float | None = None  # moving average over steps, for wait estimates
        self._inbox_tokens = 0
        self._go: threading.Event | None = None  # set by load(): the loop thread already runs
        self._thread = _thread or threading.Thread(target=self._run, name=f"engine-{engine.model_name}", daemon=True)

    @classmethod
    def from_options(cls, model: str, max_queue: int = 1024, **engine_options: Any) -> AsyncEngine:
        """Build an Engine for `model` with `engine_options` in the loop thread (see load)."""
        return cls.load(functools.partial(Engine, model, **engine_options), max_queue)

    @classmethod
    def load(cls, build: Callable[[], Engine], max_queue: int = 1024) -> AsyncEngine:
        """Build the engine in the thread that will step it (see the module docstring).

        Returns once the engine is built; an error while building is raised here, in the
        caller. start() then lets the thread go on into the loop."""
        built = threading.Event()
        go = threading.Event()
        box: dict[str, Any] = {}

        def body() -> None:
            try:
                box["engine"] = build()
            except BaseException as e:  # noqa: BLE001 - handed to the caller below
                box["error"] = e
                return
            finally:
                built.set()
            go.wait()
            box["self"]._run()

        thread = threading.Thread(target=body, name="engine-loading", daemon=True)
        thread.start()
        built.wait()
        if "error" in box:
            thread.join()
            raise box["error"]
        self = cls(box["engine"], max_queue, _thread=thread)
        thread.name = f"engine-{self.model_name}"
        box["self"] = self
        self._go = go
        return self

    # ---- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        if self._go is not None:
            self._go.set()
        else:
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop (requests still in it are aborted) and save the disk tier."""
        self._stopping = True
        self._wake.set()
        if self._go is not None:
            self._go.set()  # a loaded engine that never started: let its thread see _stopping
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)
        if not self._thread.is_alive():
            self.engine.close()  # saves the KV cache to the disk tier, if there is one

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._dead is None

    def stats(self) -> dict[str, Any]:
        """A snapshot taken by the loop after its last step (reading it never blocks the loop)."""
        stats: dict = dict(self._stats)
        with self._lock:
            stats["waiting"] += len(self._adds)
            stats["pending_tokens"] += self._inbox_tokens
            stats["calls_in_flight"] = len({id(s) for s, _ in self._routes.values()})
        stats["seconds_per_token"] = self.seconds_per_token
        g = getattr(getattr(getattr(self.engine, "runner", None), "sampler", None), "guided_stats", None)
        if g is not None:
            stats.update(guided_mask_steps=g.steps, guided_mask_rows=g.rows, guided_mask_seconds=g.seconds,
                         guided_compiles=self.grammars.misses, guided_compile_cache_hits=self.grammars.hits)
        return stats

    # ---- requests (event-loop side) ------------------------------------------
    def prepare(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Token ids of a prompt, checked against the context; InvalidRequestError names the
        field at fault. A text so long that even `max_token_chars` per token would overflow
        the context is refused before it is tokenized."""
        if isinstance(prompt, str):
            self._check_chars(len(prompt), "prompt")
        ids = self.engine.prepare(prompt, params, self.tokenizer)
        if params.constrained:
            self.grammars.prepare(params)  # compile (cached) before the engine loop sees it
        return ids

    def check_constraint(self, guided: GuidedDecoding) -> None:
        """Compile a constraint (cached) only to check it: InvalidRequestError names its field."""
        self.grammars.compile(guided)

    def chat_ids(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                 tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of a conversation through the model's chat template (with `tools`, in
        the template's tool format or the generic one: tokenizer.py)."""
        self._check_chars(sum(len(str(m.get("content") or "")) for m in messages), "messages")
        return chat_prompt_ids(self.tokenizer, messages, add_generation_prompt, f"model {self.model_name!r}",
                               tools=tools)

    def _check_chars(self, chars: int, field: str) -> None:
        """Refuse a text that cannot fit the context whatever its tokens (2x margin for
        normalization), without tokenizing it."""
        if self.max_token_chars and chars > 2 * self.max_token_chars * self.max_model_len:
            raise InvalidRequestError(f"{field}: {chars} characters cannot fit this model's context "
                                      f"of {self.max_model_len} tokens")

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> RequestStream:
        """Queue a call's validated prompts; returns its stream of deltas.

        Raises QueueFullError or EngineDeadError at once (not on first iteration), so
        callers can answer 429 / 503 before they start a response."""
        if not self.is_alive:
            raise EngineDeadError(f"the engine loop of model {self.model_name!r} is not running")
        if params.constrained:
            self.grammars.prepare(params)  # a no-op after prepare(); params that crossed a process need it
        call = next(_call_ids)
        stream = RequestStream(self, [f"{call}-{k}" for k in range(len(prompts))])
        with self._lock:
            if self._stats["waiting"] + len(self._adds) + len(prompts) > self.max_queue:
                raise QueueFullError(f"the queue of model {self.model_name!r} is full ({self.max_queue} waiting)")
            for k, (rid, ids) in enumerate(zip(stream.ids, prompts)):
                self._adds.append((rid, ids, params))
                self._routes[rid] = (stream, k)
                self._inbox_tokens += params.n * (len(ids) + min(params.max_tokens or 256, 256))
        self._wake.set()
        return stream

    def _abort(self, ids: list[str]) -> None:
        if not ids:
            return
        with self._lock:
            for rid in ids:
                self._routes.pop(rid, None)
            self._aborts.extend(ids)
        self._wake.set()

    def fail_all(self, error: BaseException) -> int:
        """End every call in flight with `error` (from any thread); returns how many."""
        with self._lock:
            routes, self._routes = self._routes, {}
            self._aborts.extend(routes)
        streams = {id(s): s for s, _ in routes.values()}
        for stream in streams.values():
            stream.put(error)
        self._wake.set()
        return len(streams)

    # ---- the loop (engine thread) --------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping:
                self._take_inbox()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                self._step()
        except BaseException as e:  # noqa: BLE001 - the loop must not die silently
            log.exception("engine loop of %s died", self.model_name)
            self._dead = e
            self.fail_all(EngineDeadError(f"the engine loop of model {self.model_name!r} stopped: {e}"))
        finally:
            for rid in list(self.engine.requests):
                self.engine.abort_request(rid)

    def _step(self) -> None:
        try:
            start = time.perf_counter()
            deltas = self.engine.step()
            self._time_step(time.perf_counter() - start)
        except Exception as e:  # noqa: BLE001 - keep serving; fail only the requests in flight
            log.exception("engine step failed; ending %d requests", len(self.engine.requests))
            failed = list(self.engine.requests)
            for rid in failed:
                self.engine.abort_request(rid)
            self._fail(failed, EngineError(f"engine error: {e}"))
            self._stats = self.engine.stats()
            return
        with self._lock:
            for d in deltas:
                route = self._routes.get(d.request_id)
                if route is not None:
                    route[0].put((route[1], d))
                    if d.finished:
                        del self._routes[d.request_id]
        self._stats = self.engine.stats()

    def _fail(self, ids: list[str], error: BaseException) -> None:
        with self._lock:
            routes = [self._routes.pop(rid, None) for rid in ids]
        for stream in {id(r[0]): r[0] for r in routes if r is not None}.values():
            stream.put(error)

    def _time_step(self, seconds: float) -> None:
        """Seconds per computed token, an exponential moving average over steps (weight 0.2)."""
        tokens = self.engine.last_step_tokens
        if tokens:
            spt = seconds / tokens
            old = self.seconds_per_token
            self.seconds_per_token = spt if old is None else 0.8 * old + 0.2 * spt

    def _take_inbox(self) -> None:
        with self._lock:
            adds, self._adds = self._adds, []
            self._inbox_tokens = 0
            aborts, self._aborts = self._aborts, []
        for rid in aborts:
            self.engine.abort_request(rid)
        aborted = set(aborts)
        for rid, ids, params in adds:
            if rid in aborted:
                continue
            try:
                self.engine.add_request(rid, ids, params)
            except Exception as e:  # noqa: BLE001 - fail this request only
                self.engine.abort_request(rid)
                if not isinstance(e, InvalidRequestError):
                    log.exception("adding request %s failed", rid)
                    e = EngineError(f"engine error while adding the request: {e}")
                self._fail([rid], e)
        if adds or aborts:
            self._stats = self.engine.stats()
