"""Start a server process on 127.0.0.1, wait until it answers, and stop it with its workers.

One way for everything that starts servers: the tests (`tests/server_util.py`), the peers
harness (tuili, llama-server, vLLM) and its cold-start measurement. A server runs in its
own process group with its output in a log file, so a signal to the group also reaches
its workers (vLLM's engine core); after a grace period the group is killed. Ready means
GET /health answers 200 and, with `need_model`, GET /v1/models lists a model (llama-server
answers /health with 503 while it loads, vLLM only after its warm-up). A server that exits
or is not ready in time raises RuntimeError with the tail of its log.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

READY_TIMEOUT_S = 600.0


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tuili_serve_cmd(port: int, *extra: str) -> list[str]:
    """`tuili serve` on 127.0.0.1:port from the same Python (and source tree) as the caller."""
    return [sys.executable, "-m", "tuili.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *extra]


@dataclass
class Launched:
    proc: subprocess.Popen
    base_url: str
    log_path: Path
    model: str = ""  # first id of GET /v1/models (when waited for with need_model)
    start_s: float = 0.0  # process start to ready

    def stop(self, grace_s: float = 30.0, sig: int = signal.SIGTERM) -> None:
        """Signal the process group, wait up to `grace_s`, then kill the group."""
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass

    def log_tail(self, lines: int = 5) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def wait_ready(base_url: str, proc: subprocess.Popen, timeout_s: float, poll_s: float = 0.05,
               need_model: bool = True) -> str:
    """Poll until /health is 200 (and /v1/models lists a model); returns that model id or ''."""
    deadline = time.perf_counter() + timeout_s
    with httpx.Client(timeout=5.0, trust_env=False) as client:
        while time.perf_counter() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"exited with status {proc.returncode} before it was ready")
            try:
                if client.get(base_url + "/health").status_code == 200:
                    if not need_model:
                        return ""
                    data = client.get(base_url + "/v1/models").json().get("data") or []
                    if data:
                        return str(data[0]["id"])
            except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
                pass
            time.sleep(poll_s)
    raise RuntimeError(f"not ready after {timeout_s:.0f} s")


def launch(cmd: list[str], port: int, log_path: Path, *, env: dict[str, str] | None = None,
           timeout_s: float = READY_TIMEOUT_S, need_model: bool = True, tail_lines: int = 5) -> Launched:
    """Start `cmd` (a server on 127.0.0.1:port) with its output in `log_path`; return once it is ready."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    base_url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    with log_path.open("w") as f:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT,
                                env=dict(os.environ) if env is None else env, start_new_session=True)
    server = Launched(proc, base_url, log_path)
    try:
        server.model = wait_ready(base_url, proc, timeout_s, need_model=need_model)
    except BaseException as e:
        server.stop(grace_s=10.0)
        if not isinstance(e, RuntimeError):
            raise
        raise RuntimeError(f"{e}; log {log_path}:\n{server.log_tail(tail_lines)}") from None
    server.start_s = time.perf_counter() - t0
    return server
