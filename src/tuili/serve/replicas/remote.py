"""`RemoteEngine`: the surface of `AsyncEngine` that the HTTP app uses, served by Ray replicas.

The FastAPI app (routes, calls, errors, API key, streaming, the model router, /health,
/metrics, the web pages) talks to engines only through `AsyncEngine`'s public surface:
`prepare`, `chat_ids`, `generate` -> a stream of `(prompt index, RequestDelta)` with
`abort()`, `stats()`, `is_alive`, `fail_all`, `start`/`shutdown`. `RemoteEngine` is a
subclass that keeps tokenization and the prompt checks local (the tokenizer is loaded
from the same model folder the replicas use) and forwards `generate` to the engine
deployment through a streaming deployment handle, so the app runs unchanged.

Decisions:
- The prompt checks here are the early, cheap ones (token range, context, max_tokens);
  the replica's engine checks again and its verdict wins (an error item -> the same
  exception type here, so the same HTTP status).
- Retries: a replica that fails before the call got any delta (it died, was restarted,
  or went away while the call waited in its queue) costs nothing visible, so the call is
  sent again, up to `RETRIES` times, and the router sees the dead replica go. A failure
  after deltas were handed out cannot be hidden: the call ends with `EngineError` (a clean
  error event in a stream, 500 otherwise).
- Abort: the stream's `abort()` (client gone, call cancelled) cancels the Ray generator;
  Ray cancels the replica's generator, which aborts the engine requests and frees their
  KV blocks at the next step.
- Load and figures: `stats()` is the sum of the replicas' last snapshots (taken by
  `stats.py` when /metrics, /v1/stats or /health is asked) plus the calls in flight here.
"""
from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, AsyncIterator

from ...engine import (AsyncEngine, EngineDeadError, EngineError, EngineShutdownError, InvalidRequestError,
                       QueueFullError, RequestDelta)
from ...sampling import SamplingParams
from .routing import RouteKey, block_hashes, started

log = logging.getLogger("tuili.replicas")

RETRIES = 4
SESSION: contextvars.ContextVar[str | None] = contextvars.ContextVar("tuili_session", default=None)


class ReplicaQueueFullError(QueueFullError, EngineError):
    """A replica's full queue, known only once the call reached it: an EngineError too, so the
    call paths that catch engine errors after submission answer it (429, from its type)."""


_ERRORS = {"InvalidRequestError": InvalidRequestError, "QueueFullError": ReplicaQueueFullError,
           "EngineDeadError": EngineDeadError, "EngineShutdownError": EngineShutdownError}
_calls = itertools.count()


def error_from(kind: str, message: str) -> BaseException:
    return _ERRORS.get(kind, EngineError)(message)


class EngineShape:
    """The few facts about a replica's engine that tokenizing and checking need."""

    def __init__(self, info: dict[str, Any], replicas: int):
        self.model_name = info["model_name"]
        folder = info.get("model_folder")
        self.model_folder = Path(folder) if folder else None
        self.tokenizer = info.get("has_tokenizer")  # AsyncEngine loads its own when truthy
        self.max_model_len = int(info["max_model_len"])
        self.max_seq_len = int(info["max_seq_len"])
        self.vocab_size = int(info["vocab_size"])
        self.block_size = int(info["block_size"])
        self.num_blocks = int(info["num_blocks"])
        self.replicas = replicas
        self.model_config = SimpleNamespace(vocab_size=self.vocab_size, hidden_size=int(info.get("hidden_size", 0)),
                                            num_layers=int(info.get("num_layers", 0)))
        self.eos_token_ids = list(info.get("eos_token_ids") or [])

    def stats(self) -> dict[str, Any]:
        return dict(EMPTY_STATS, kv_blocks_total=self.num_blocks * self.replicas,
                    kv_blocks_free=self.num_blocks * self.replicas)

    def prepare(self, prompt: str | list[int], params: SamplingParams, tokenizer=None) -> list[int]:
        if isinstance(prompt, str):
            if tokenizer is None:
                raise InvalidRequestError("prompt: this model has no tokenizer; send token ids")
            ids = tokenizer(prompt).input_ids
        else:
            ids = list(prompt)
        if not ids:
            raise InvalidRequestError("prompt: must not be empty")
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size for t in ids):
            raise InvalidRequestError(f"prompt: token ids must be integers in [0, {self.vocab_size})")
        limit = self.max_model_len
        if len(ids) >= limit:
            raise InvalidRequestError(f"prompt: {len(ids)} tokens is too long; this model's context is {limit} tokens")
        if params.max_tokens is not None and len(ids) + params.max_tokens > limit:
            raise InvalidRequestError(f"max_tokens: the prompt has {len(ids)} tokens and max_tokens is "
                                      f"{params.max_tokens}, together more than this model's context of {limit} tokens")
        total = len(ids) + (params.max_tokens or 1)
        if total > self.max_seq_len:
            raise InvalidRequestError(f"prompt: {len(ids)} tokens plus max_tokens need "
                                      f"{-(-total // self.block_size)} KV blocks, but the pool has only "
                                      f"{self.num_blocks}")
        return ids


EMPTY_STATS: dict[str, Any] = {"running": 0, "waiting": 0, "kv_blocks_used": 0, "kv_blocks_free": 0,
                               "kv_blocks_total": 0, "preemptions": 0, "prefix_hit_tokens": 0,
                               "prefix_query_tokens": 0, "pending_tokens": 0}


class RemoteStream:
    """`RequestStream`'s surface over a Ray streaming call, with retries before the first delta."""

    def __init__(self, engine: RemoteEngine, key: RouteKey, prompts: list[list[int]], params: SamplingParams):
        self._engine = engine
        call = next(_calls)
        self.ids = [f"r{call}-{k}" for k in range(len(prompts))]
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._open = set(range(len(prompts)))
        self.aborted = False
        self.replica: str | None = None
        self.attempts = 0
        self._gen = None
        self._key, self._prompts, self._params = key, prompts, params
        self._sent = time.perf_counter()
        self._task = self._loop.create_task(self._pump())

    async def _pump(self) -> None:
        delivered = False
        first_token: float | None = None
        tokens = 0
        while True:
            self.attempts += 1
            self._gen = gen = self._engine.handle.generate.remote(self._key, self._prompts, self._params)
            counted = False
            done: set[int] = set()
            try:
                async for item in gen:
                    if item[0] == "start":
                        self.replica = item[1]
                        started(self._engine.deployment, self.replica, +1)
                        counted = True
                        continue
                    if item[0] == "error":
                        self._queue.put_nowait(error_from(item[1], item[2]))
                        return
                    k, delta = item
                    n = sum(len(c.token_ids) for c in delta.outputs)
                    if n and first_token is None:
                        first_token = time.perf_counter()
                    tokens += n
                    delivered = True
                    if delta.finished:
                        done.add(k)
                        if counted and len(done) >= len(self._prompts):
                            # the last delta is out: the replica no longer serves this call, though
                            # its generator may end a moment later (the router reads this count)
                            started(self._engine.deployment, self.replica, -1)
                            counted = False
                    self._queue.put_nowait((k, delta))
                return
            except asyncio.CancelledError:
                gen.cancel()
                raise
            except Exception as e:  # noqa: BLE001 - a replica failure: retry when nothing was delivered
                if not delivered and self.attempts <= RETRIES and self._engine.is_alive:
                    log.warning("call %s: replica %s failed before its first delta (%s: %s); sending it again",
                                self.ids[0], self.replica or "?", type(e).__name__, str(e)[:200])
                    self._engine.retries += 1
                    await asyncio.sleep(0.2 * self.attempts)
                    continue
                log.error("call %s: replica %s failed: %s: %s", self.ids[0], self.replica or "?", type(e).__name__,
                          str(e)[:300])
                kind = EngineError if delivered else EngineDeadError
                self._queue.put_nowait(kind(f"the engine replica {self.replica or '?'} failed: {type(e).__name__}"))
                return
            finally:
                if counted:
                    started(self._engine.deployment, self.replica, -1)
                if self.replica is not None:
                    ttft = None if first_token is None else first_token - self._sent
                    self._engine.observe(self.replica, tokens, ttft)
                    first_token, tokens = None, 0

    def put(self, item) -> None:  # any thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:
            pass

    def __aiter__(self) -> AsyncIterator[tuple[int, RequestDelta]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[tuple[int, RequestDelta]]:
        try:
            while self._open:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    self.abort()
                    raise item
                k, delta = item
                if delta.finished:
                    self._open.discard(k)
                yield k, delta
        finally:
            if self._open:
                self.abort()
            self._engine._closed(self)

    @property
    def finished(self) -> bool:
        return not self._open

    def abort(self) -> None:
        """Cancel the call on its replica (idempotent); from the event loop's thread."""
        if self.aborted:
            return
        self.aborted = True
        self._open.clear()
        if not self._task.done():
            self._task.cancel()
        if self._gen is not None:
            try:
                self._gen.cancel()
            except Exception:  # noqa: BLE001 - already finished
                pass
        self._engine._closed(self)


class RemoteEngine(AsyncEngine):
    """AsyncEngine's surface, forwarding generation to the replicas of one Ray Serve deployment."""

    def __init__(self, info: dict[str, Any], handle, deployment: str, replicas: int, max_queue: int = 1024):
        super().__init__(EngineShape(info, replicas), max_queue)
        self.handle = handle.options(stream=True)
        self.deployment = deployment
        self.block_size = int(info["block_size"])
        self.replica_stats: dict[str, dict[str, Any]] = {}  # replica id -> its last snapshot
        self.replica_figures: dict[str, dict[str, float]] = {}  # replica id -> tokens, ttft sums seen here
        self.retries = 0
        self._streams: set[RemoteStream] = set()
        self._stats_lock = threading.Lock()
        self._alive = True
        self._shut = False

    # ---- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        pass

    def shutdown(self, timeout: float = 10.0) -> None:
        self._shut = True

    @property
    def is_alive(self) -> bool:
        return self._alive and not self._shut

    def set_alive(self, alive: bool) -> None:
        self._alive = alive

    # ---- requests --------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> RemoteStream:
        if not self.is_alive:
            raise EngineDeadError(f"no replica of model {self.model_name!r} is running")
        waiting = sum(int(s.get("waiting", 0)) for s in self.replica_stats.values())
        replicas = max(len(self.replica_stats), 1)
        if waiting + len(prompts) > self.max_queue * replicas:
            raise QueueFullError(f"the queues of model {self.model_name!r} are full "
                                 f"({self.max_queue} waiting per replica)")
        key = RouteKey(block_hashes(prompts[0], self.block_size) if prompts else (), self.block_size, SESSION.get())
        stream = RemoteStream(self, key, prompts, params)
        self._streams.add(stream)
        return stream

    def _closed(self, stream: RemoteStream) -> None:
        self._streams.discard(stream)

    def fail_all(self, error: BaseException) -> int:
        streams = list(self._streams)
        for s in streams:
            s.put(error)
        return len(streams)

    # ---- figures ---------------------------------------------------------------
    def observe(self, replica: str, tokens: int, ttft: float | None) -> None:
        with self._stats_lock:
            f = self.replica_figures.setdefault(replica, {"calls": 0, "tokens": 0, "ttft_sum": 0.0, "ttft_count": 0})
            f["calls"] += 1
            f["tokens"] += tokens
            if ttft is not None:
                f["ttft_sum"] += ttft
                f["ttft_count"] += 1

    def set_replica_stats(self, stats: dict[str, dict[str, Any]]) -> None:
        self.replica_stats = stats
        spts = [s["seconds_per_token"] for s in stats.values() if s.get("seconds_per_token")]
        self.seconds_per_token = sum(spts) / len(spts) if spts else None

    def stats(self) -> dict[str, Any]:
        snaps = list(self.replica_stats.values())
        if not snaps:
            out: dict[str, Any] = self.engine.stats()
        else:
            out = {}
            for s in snaps:
                for k, v in s.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in _NOT_SUMMED:
                        out[k] = out.get(k, 0) + v
            for k, v in EMPTY_STATS.items():
                out.setdefault(k, v)
        out["calls_in_flight"] = len(self._streams)
        out["seconds_per_token"] = self.seconds_per_token
        out["replicas"] = len(snaps)
        return out


_NOT_SUMMED = {"pid", "started", "torch_threads", "seconds_per_token", "calls_in_flight"}
