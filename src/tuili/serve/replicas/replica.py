"""The engine deployment: each replica is one tuili engine (`AsyncEngine`) in a Ray actor.

Decisions:
- A replica serves one model. Its `generate` is a streaming method: the deltas of one call
  flow back as they come, one Ray object each. Errors the HTTP side must map to a status
  (bad input, a full queue, a dead loop) travel as `("error", kind, message)` items rather
  than as Ray exceptions, whose wrapping differs between Ray versions.
- When the caller cancels the stream (a client went away), Ray cancels this generator;
  leaving the `async for` aborts the engine requests (`RequestStream`'s own rule), so the
  KV blocks are freed at the next step, as in the single-process server.
- Threads: Ray sets OMP_NUM_THREADS from the replica's `num_cpus`; torch reads it at import,
  but a worker may have imported torch earlier, so the count is set again here and
  reported (`torch_threads`) in the replica's stats.
- The disk tier is shared by the replicas of one machine (`TUILI_KV_DISK_SHARED=1`):
  several writers are safe there, and a block one replica wrote is a disk hit for another.
- `record_routing_stats` is Ray Serve's hook for replica statistics; the HTTP side also
  calls it directly on each replica for fresh figures (`stats.py`).
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any, AsyncIterator

log = logging.getLogger("tuili.replicas")


class EngineReplica:
    def __init__(self, model: str, engine_options: dict[str, Any], max_queue: int, threads: int):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        os.environ["TUILI_KV_DISK_SHARED"] = "1"
        import torch

        if threads > 0 and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        from ...engine import AsyncEngine

        self.engine = AsyncEngine.from_options(model, max_queue=max_queue, **engine_options)
        self.engine.start()
        self.started = time.time()
        self.replica_id = self._replica_id()
        self.torch_threads = torch.get_num_threads()
        log.info("replica %s: %s with %d torch threads (OMP_NUM_THREADS=%s), pid %d", self.replica_id,
                 self.engine.model_name, self.torch_threads, os.environ.get("OMP_NUM_THREADS"), os.getpid())

    @staticmethod
    def _replica_id() -> str:
        try:
            from ray import serve

            return serve.get_replica_context().replica_id.to_full_id_str()
        except Exception:  # noqa: BLE001 - outside Ray Serve (unit tests)
            return f"local-{os.getpid()}"

    def info(self) -> dict[str, Any]:
        """What the HTTP side needs to tokenize and check prompts like this engine does."""
        e = self.engine.engine
        return {"model_name": e.model_name, "model_folder": str(e.model_folder) if e.model_folder else None,
                "has_tokenizer": e.tokenizer is not None, "max_model_len": e.max_model_len,
                "max_seq_len": e.max_seq_len, "vocab_size": e.model_config.vocab_size,
                "hidden_size": e.model_config.hidden_size, "num_layers": e.model_config.num_layers,
                "block_size": e.config.block_size, "num_blocks": e.blocks.num_blocks,
                "eos_token_ids": list(e.eos_token_ids)}

    async def generate(self, key: Any, prompts: list[list[int]], params) -> AsyncIterator[tuple]:
        """("start", replica id), then (prompt index, RequestDelta)...; or ("error", kind, message)."""
        from ...engine import EngineDeadError, EngineError, InvalidRequestError, QueueFullError

        try:
            stream = self.engine.generate(prompts, params)
        except (QueueFullError, EngineDeadError, EngineError, InvalidRequestError) as e:
            yield ("error", type(e).__name__, str(e))
            return
        yield ("start", self.replica_id)
        try:
            async for k, delta in stream:
                yield (k, delta)
        except (EngineError, ValueError) as e:
            yield ("error", type(e).__name__, str(e))
        finally:
            stream.abort()  # no-op when finished; frees the blocks when the caller went away

    def stats(self) -> dict[str, Any]:
        s = self.engine.stats()
        return {**s, "replica": self.replica_id, "pid": os.getpid(), "host": socket.gethostname(),
                "node_id": self._node_id(), "torch_threads": self.torch_threads, "alive": self.engine.is_alive,
                "started": self.started}

    @staticmethod
    def _node_id() -> str | None:
        try:
            import ray

            return ray.get_runtime_context().get_node_id()
        except Exception:  # noqa: BLE001
            return None

    def record_routing_stats(self) -> dict[str, Any]:
        return self.stats()

    def check_health(self) -> None:
        if not self.engine.is_alive:
            raise RuntimeError(f"the engine loop of {self.engine.model_name!r} is not running")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
