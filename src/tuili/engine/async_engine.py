"""The background loop that HTTP requests join and leave.

One thread per model owns the `Engine` and runs `step()` whenever there is work. Requests
from the event loop are tokenized and validated in the caller (with a tokenizer instance
of their own, since Hugging Face fast tokenizers must not be shared across threads), then
handed to the loop thread through a locked inbox; outputs travel back through each
request's asyncio queue. Joining and leaving happen between steps, so concurrent requests
share batches. A consumer that stops listening (a client disconnect) aborts its request
at once, which frees its KV blocks at the next step boundary.

If a step raises, every request in flight gets the error, is aborted, and the loop keeps
serving new requests: one bad batch never takes the server down.

`AsyncEngine.load` builds the engine inside the loop thread. Loading runs OpenMP parallel
regions, and the first one in a thread creates that thread's OpenMP team: a model loaded in
the main thread and stepped in the loop thread leaves two teams, more OpenMP threads than
cores, and libgomp then stops spinning between parallel regions. Each step of a small model
runs about 150 of them, and batch-1 decode was about 30% slower that way
(`docs/BENCHMARKS.md`). The server loads every model with it.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from ..sampling import SamplingParams
from .engine import Engine, RequestOutput

log = logging.getLogger("tuili.engine")


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the caller should retry later (HTTP 429)."""


class EngineDeadError(RuntimeError):
    """The engine loop is not running."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngine:
    def __init__(self, engine: Engine, max_queue: int = 1024, *, _thread: threading.Thread | None = None):
        self.engine = engine
        self.max_queue = max_queue
        self.tokenizer = _own_tokenizer(engine)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._adds: list[tuple[str, list[int], SamplingParams, _Stream]] = []
        self._aborts: list[str] = []
        self._streams: dict[str, _Stream] = {}
        self._stopping = False
        self._stats = engine.stats()
        self.seconds_per_token: float | None = None  # moving average over steps, for wait estimates
        self._inbox_tokens = 0
        self._go: threading.Event | None = None  # set by load(): the loop thread already runs
        self._thread = _thread or threading.Thread(target=self._run, name=f"engine-{engine.model_name}", daemon=True)

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
        thread.name = f"engine-{self.engine.model_name}"
        box["self"] = self
        self._go = go
        return self

    # ---- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        if self._go is not None:
            self._go.set()
        else:
            self._thread.start()

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._go is not None:
            self._go.set()  # a loaded engine that never started: let its thread see _stopping
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.engine.close()  # saves the KV cache to the disk tier, if there is one

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    def stats(self) -> dict[str, int]:
        """A snapshot taken by the loop after its last step (reading it never blocks the loop)."""
        stats: dict = dict(self._stats)
        with self._lock:
            stats["waiting"] += len(self._adds)
            stats["pending_tokens"] += self._inbox_tokens
        stats["seconds_per_token"] = self.seconds_per_token
        return stats

    # ---- requests ------------------------------------------------------------
    def prepare(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        return self.engine.prepare(prompt, params, self.tokenizer)

    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Queue a validated request; returns the iterator of its cumulative outputs.

        Raises QueueFullError at once (not on first iteration) so callers can answer 429
        before they start a response. Leaving the iterator early aborts the request."""
        if not self.is_alive:
            raise EngineDeadError("the engine loop is not running")
        stream = _Stream(asyncio.get_running_loop())
        with self._lock:
            if self._stats["waiting"] + len(self._adds) >= self.max_queue:
                raise QueueFullError(f"the queue of model {self.model_name!r} is full ({self.max_queue} waiting)")
            self._adds.append((request_id, prompt_ids, params, stream))
            self._inbox_tokens += params.n * (len(prompt_ids) + min(params.max_tokens or 256, 256))
            self._streams[request_id] = stream
        self._wake.set()
        return self._iterate(request_id, stream)

    async def _iterate(self, request_id: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
            self._streams.pop(request_id, None)
        self._wake.set()

    # ---- the loop ------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            self._take_inbox()
            if not self.engine.has_unfinished_requests():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                start = time.perf_counter()
                outputs = self.engine.step()
                self._time_step(time.perf_counter() - start)
            except Exception as e:  # noqa: BLE001 - keep serving; fail only the requests in flight
                log.exception("engine step failed; aborting %d requests", len(self.engine.requests))
                self._fail_all(e)
                continue
            with self._lock:
                for out in outputs:
                    stream = self._streams.get(out.request_id)
                    if stream is not None:
                        stream.put(out)
                    if out.finished:
                        self._streams.pop(out.request_id, None)
            self._stats = self.engine.stats()

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
        for rid, ids, params, stream in adds:
            try:
                self.engine.add_request(rid, ids, params)
            except ValueError as e:
                stream.put(e)
        for rid in aborts:
            self.engine.abort_request(rid)
        if adds or aborts:
            self._stats = self.engine.stats()

    def _fail_all(self, error: Exception) -> None:
        for rid in list(self.engine.requests):
            self.engine.abort_request(rid)
        with self._lock:
            streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.put(RuntimeError(f"engine error: {error}"))
        self._stats = self.engine.stats()


def _own_tokenizer(engine: Engine):
    if engine.tokenizer is None or engine.model_folder is None:
        return engine.tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(engine.model_folder))
