"""Two Ray nodes as separate processes on this machine (`ray start --head` and `ray start
--address`), and `tuili serve --ray-address ... --replicas 2` spreading its replicas over
them, as the README's several-machines steps do."""
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from server_util import running_server
from tuili.bench.launch import free_port

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))


def ray_node(*args: str, log: Path) -> subprocess.Popen:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")  # a loopback test cluster
    head = ["--include-dashboard=false"] if "--head" in args else []
    return subprocess.Popen([RAY, "start", "--block", "--num-cpus", "1", *head,
                             "--node-ip-address", "127.0.0.1", *args], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster():
    port = free_port()
    logs = Path(tempfile.mkdtemp(prefix="tuili-ray-"))
    head = ray_node("--head", "--port", str(port), log=logs / "head.log")
    time.sleep(8)
    worker = ray_node("--address", f"127.0.0.1:{port}", log=logs / "worker.log")
    time.sleep(8)
    try:
        assert head.poll() is None and worker.poll() is None, (logs / "head.log").read_text()[-2000:]
        yield f"127.0.0.1:{port}"
    finally:
        stop(worker)
        stop(head)


def test_replicas_spread_over_two_nodes(cluster, default_model_folder):
    with running_server("--dtype", "float32", "--kv-cache-memory", "128MiB", "--replicas", "2",
                        "--cpus-per-replica", "1", "--ray-address", cluster) as (base, _):
        r = httpx.post(base + "/v1/completions", json={"model": "smollm2-135m-instruct", "prompt": "Hi",
                                                        "max_tokens": 3}, timeout=120)
        assert r.status_code == 200
        rows = httpx.get(base + "/v1/stats", timeout=30).json()["replicas"][0]["replicas"]
        assert len(rows) == 2 and len({row["node_id"] for row in rows}) == 2, rows
