"""The server end to end on the GPU without the default model's GGUF: `tuili serve` on a
random-weight Llama (the 135M shape, or `--tiny`) with a byte-level tokenizer built here,
driven by the official openai client, as tests/test_server_e2e.py drives the real model.

Checks: /v1/models and /health; a chat completion's shape and usage; streamed text equals
the non-streamed text (greedy); completions with logprobs; 32 concurrent streams all
finish; a bad request gets an OpenAI-style 4xx and the server keeps serving; the KV
blocks return to the pool. Prints one JSON line per check and exits 1 if any failed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "tests"))
from models import make_folder  # noqa: E402

try:  # the tests' helper, so the server starts as in tests/test_server_e2e.py
    from server_util import running_server  # noqa: E402
except ImportError:  # tests/ moved on: the same few lines here
    import os
    import signal
    import socket
    import subprocess
    import tempfile
    from contextlib import contextmanager

    @contextmanager
    def running_server(*extra: str, timeout: float = 240.0):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = tempfile.NamedTemporaryFile("w+", prefix="tuili-serve-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "tuili.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *extra]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read()[-4000:]}")
                try:
                    if httpx.get(base + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("server did not become healthy in time")
                time.sleep(0.5)
            yield base, log.name
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

CHAT = [{"role": "user", "content": "Write three sentences about the sea."}]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--workdir", default="/tmp/tuili-gpu-models")
    ap.add_argument("--out", default="server_check.jsonl")
    args = ap.parse_args()
    shape = "tiny" if args.tiny else "135m"
    import torch

    gen = "cuda" if args.device.startswith("cuda") and torch.cuda.is_available() else "cpu"
    folder = make_folder(shape, Path(args.workdir), device=gen, seed=1, tokenizer=True)
    results: list[dict] = []

    def check(name: str, fn) -> None:
        t = time.perf_counter()
        try:
            detail = fn()
            rec = {"check": name, "ok": True, **(detail or {})}
        except Exception as e:  # noqa: BLE001 - report every check
            rec = {"check": name, "ok": False, "error": f"{type(e).__name__}: {str(e)[:400]}"}
        rec["seconds"] = round(time.perf_counter() - t, 2)
        results.append(rec)
        print(json.dumps(rec), flush=True)

    extra = ("--device", args.device, "--dtype", "bfloat16", "--kv-cache-memory", "512MiB", "--max-num-seqs", "64",
             "--served-model-name", "random")
    with running_server(str(folder), *extra) as (base, log):
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)

        def models():
            ids = [m.id for m in client.models.list().data]
            assert ids == ["random"], ids
            assert httpx.get(base + "/health").json() == {"status": "ok"}

        def chat():
            r = client.chat.completions.create(model="random", messages=CHAT, max_tokens=12, temperature=0)
            assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
            assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
            return {"completion_tokens": r.usage.completion_tokens}

        def stream_equals():
            kw = dict(model="random", messages=CHAT, max_tokens=24, temperature=0)
            full = client.chat.completions.create(**kw).choices[0].message.content
            chunks = list(client.chat.completions.create(**kw, stream=True))
            streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert streamed == full, (streamed, full)

        def logprobs():
            r = client.completions.create(model="random", prompt="The sea is", max_tokens=5, temperature=0, logprobs=3)
            lp = r.choices[0].logprobs
            assert len(lp.token_logprobs) == r.usage.completion_tokens and all(x <= 0 for x in lp.token_logprobs)

        def concurrent():
            def one(i: int) -> int:
                s = client.chat.completions.create(model="random", messages=[{"role": "user", "content": f"n {i}"}],
                                                   max_tokens=32, temperature=0.8, seed=i, stream=True)
                return sum(1 for c in s if c.choices and c.choices[0].delta.content)
            with ThreadPoolExecutor(32) as pool:
                counts = list(pool.map(one, range(32)))
            assert all(c > 0 for c in counts), counts
            return {"streams": len(counts)}

        def bad_request():
            r = httpx.post(base + "/v1/chat/completions", json={"model": "random", "messages": CHAT, "max_tokens": -3})
            body = r.json()
            assert 400 <= r.status_code < 500 and set(body["error"]) >= {"message", "type", "param", "code"}, body
            client.chat.completions.create(model="random", messages=CHAT, max_tokens=2)

        def blocks_back():
            for _ in range(40):
                text = httpx.get(base + "/metrics").text
                used = [line for line in text.splitlines() if line.startswith("tuili_kv_blocks_used")]
                if used and float(used[0].split()[-1]) == 0:
                    return
                time.sleep(0.25)
            raise AssertionError(f"blocks still in use: {used}")

        for name, fn in (("models_and_health", models), ("chat_completion", chat), ("stream_equals_non_stream",
                         stream_equals), ("completion_logprobs", logprobs), ("32_concurrent_streams", concurrent),
                         ("bad_request_4xx_then_serves", bad_request), ("kv_blocks_return", blocks_back)):
            check(name, fn)
        engine_line = next((line.strip() for line in open(log) if "engine ready" in line), None)
    with open(args.out, "a") as f:
        for rec in results:
            f.write(json.dumps({**rec, "engine": engine_line}) + "\n")
    print(json.dumps({"server_check": "done", "passed": sum(r["ok"] for r in results), "of": len(results),
                      "engine": engine_line}))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
