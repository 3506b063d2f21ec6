"""`tuili serve --replicas 2` passes the same end-to-end tests as `tuili serve`.

The tests of test_server_e2e.py run here again (imported), against a server whose engines
are two Ray Serve replicas behind the same HTTP app; servers those tests start themselves
get `--replicas 2` too. Then what only replicas have: per-replica figures, routing
decisions, sticky sessions, and a replica killed under load."""
import asyncio
import os
import re
import signal
import time

import httpx
import pytest

import test_server_e2e as base
from server_util import running_server
from test_server_e2e import *  # noqa: F401,F403 - the same end-to-end tests, collected again here

REPLICAS = ("--replicas", "2", "--cpus-per-replica", "1")
_plain_running_server = base.running_server


def _replicated(*extra, **kw):
    return _plain_running_server(*extra, *REPLICAS, **kw)


@pytest.fixture(scope="module", autouse=True)
def _servers_have_replicas():
    base.running_server = _replicated
    yield
    base.running_server = _plain_running_server


@pytest.fixture(scope="module")
def server(default_model_folder):
    with running_server("--dtype", "float32", "--kv-cache-memory", "256MiB", "--max-num-seqs", "64",
                        *REPLICAS) as (b, log):
        yield b, log


def stats(b: str) -> dict:
    return httpx.get(b + "/v1/stats", timeout=30).json()


def test_stats_list_both_replicas_and_sum_them(server):
    b = server[0]
    httpx.post(b + "/v1/completions", json={"model": base.MODEL, "prompt": "Hi", "max_tokens": 3}, timeout=60)
    s = stats(b)
    rows = s["replicas"][0]["replicas"]
    assert len(rows) == 2 and len({r["pid"] for r in rows}) == 2
    assert all(r["torch_threads"] == 1 for r in rows)  # num_cpus=1 -> one torch thread each
    assert s["kv"]["device"]["total"] == sum(r["kv_blocks_total"] for r in rows)
    metrics = httpx.get(b + "/metrics").text
    assert metrics.count("tuili_replica_kv_blocks_total{") == 2
    assert "tuili_replica_route_decisions_total{" in metrics


def test_same_prefix_and_same_session_stay_on_one_replica(server):
    b = server[0]
    system = "You are a helpful assistant for the harbour office. " * 20

    def replica_counts() -> dict:
        return {r["replica"]: r["calls"] for r in stats(b)["replicas"][0]["replicas"]}

    def decisions() -> dict:
        """Routing decisions by reason, summed over replicas (earlier tests of the module add to them)."""
        out: dict = {}
        for m in re.finditer(r'^tuili_replica_route_decisions_total\{[^}]*reason="([^"]+)"[^}]*\} (\S+)$',
                             httpx.get(b + "/metrics").text, re.M):
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
        return out

    before, reasons = replica_counts(), decisions()
    for i in range(4):
        r = httpx.post(b + "/v1/chat/completions", timeout=60, json={
            "model": base.MODEL, "max_tokens": 2,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": f"question {i}"}]})
        assert r.status_code == 200
    after = replica_counts()
    moved = [rid for rid in after if after[rid] != before.get(rid, 0)]
    assert len(moved) == 1, (before, after)  # one replica took every call of the shared prefix
    for i in range(3):
        r = httpx.post(b + "/v1/completions", timeout=60, headers={"X-Session-Id": "s-1"},
                       json={"model": base.MODEL, "prompt": f"unrelated text {i} " * (i + 1), "max_tokens": 2})
        assert r.status_code == 200
    now = decisions()
    gained = {k: now.get(k, 0) - reasons.get(k, 0) for k in now}
    assert gained.get("prefix", 0) >= 3 and gained.get("session", 0) >= 2, (reasons, now)


def test_killed_replica_calls_retried_and_replica_restarted(server):
    b = server[0]
    rows = stats(b)["replicas"][0]["replicas"]
    victim = rows[0]

    async def one(c, i):
        body = {"model": base.MODEL, "prompt": f"Story {i}: once upon a time", "max_tokens": 48,
                "ignore_eos": True, "stream": True}
        got_text, error, done = False, None, False
        async with c.stream("POST", b + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    if '"error"' in line:
                        error = line
                    elif '"text": ""' not in line:
                        got_text = True
                if line == "data: [DONE]":
                    done = True
        return got_text, error, done

    async def main():
        async with httpx.AsyncClient(timeout=120) as c:
            tasks = [asyncio.create_task(one(c, i)) for i in range(12)]
            await asyncio.sleep(1.0)
            os.kill(victim["pid"], signal.SIGKILL)
            return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    for got_text, error, done in results:
        assert done
        assert error is None or got_text, results  # a call with no text yet was sent again, never failed
    assert any(e is None for _, e, _ in results)
    r = httpx.post(b + "/v1/completions", json={"model": base.MODEL, "prompt": "After", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200
    assert httpx.get(b + "/health").status_code == 200
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # Ray Serve starts a replacement
        rows = stats(b)["replicas"][0]["replicas"]
        if len(rows) == 2 and victim["pid"] not in {r["pid"] for r in rows}:
            break
        time.sleep(1)
    assert len(rows) == 2 and victim["pid"] not in {r["pid"] for r in rows}, rows
