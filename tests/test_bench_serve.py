"""`tuili bench serve` against a fake OpenAI-compatible streaming server on a real socket.

The fake server streams K one-token chunks, sleeping DELAY before each. Speed is not
asserted here (that is for benchmarks): the tests check counts, the JSON written, the
statistics on synthetic results, and lower bounds that the server's sleeps guarantee. The requested
model name picks its behaviour: "fake" streams normally, "no-usage" omits the usage
chunk, "fail-500" / "fail-400" answer with that status, "stream-error" sends an error
object inside the stream.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import socket
import time
from types import SimpleNamespace

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

import tuili.bench.workload as workload
from server_util import app_in_thread, fake_openai_app
from tuili.bench import serve_bench
from tuili.bench.client import RequestResult, arrival_times, run_benchmark
from tuili.bench.serve_bench import add_arguments, run_from_args
from tuili.bench.stats import duration_of, parse_goodput, summarize

K = 6
DELAY = 0.02
CORPUS = " ".join(f"w{i % 97}" for i in range(3000))


def make_app(received: list[dict]) -> FastAPI:
    async def handle(request: Request, chat: bool):
        body = await request.json()
        received.append(body)
        model = body.get("model")
        if model == "fail-500":
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, status_code=500)
        if model == "fail-400":
            return JSONResponse({"error": {"message": "bad request", "type": "invalid_request_error"}},
                                status_code=400)
        n = int(body["max_tokens"])
        usage_on = body.get("stream_options", {}).get("include_usage") and model != "no-usage"
        prompt_tokens = len((body["messages"][0]["content"] if chat else body["prompt"]).split())

        async def stream():
            # a role-only first chunk (no text) as vLLM sends for chat: must not count as the first token
            if chat:
                yield "data: " + json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}) + "\n\n"
            for i in range(n):
                await asyncio.sleep(DELAY)
                if model == "stream-error" and i == 2:
                    yield "data: " + json.dumps({"error": {"message": "engine died", "code": 500}}) + "\n\n"
                    return
                choice = {"index": 0, "delta": {"content": f" t{i}"}} if chat else {"index": 0, "text": f" t{i}"}
                yield "data: " + json.dumps({"id": "x", "choices": [choice], "usage": None}) + "\n\n"
            if usage_on:
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
                yield "data: " + json.dumps({"id": "x", "choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return fake_openai_app(handle, ("fake", "other"))


@pytest.fixture(scope="module")
def server():
    received: list[dict] = []
    with app_in_thread(make_app(received)) as url:
        yield SimpleNamespace(url=url, received=received)


class WordTokenizer:
    """Whitespace 'tokenizer' over the fake corpus, enough for workload.random_prompt_texts."""

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.words: list[str] = []

    def __call__(self, text, add_special_tokens=False):
        ids = []
        for w in text.split():
            if w not in self.vocab:
                self.vocab[w] = len(self.words)
                self.words.append(w)
            ids.append(self.vocab[w])
        return SimpleNamespace(input_ids=ids)

    def decode(self, ids):
        return " ".join(self.words[i] for i in ids)


@pytest.fixture
def fake_workload(monkeypatch):
    monkeypatch.setattr(workload, "corpus_text", lambda: CORPUS)
    tok = WordTokenizer()
    monkeypatch.setattr(serve_bench, "load_tokenizer", lambda name: tok)
    return tok


def prompts(n: int) -> list[str]:
    return [f"prompt number {i} " + "word " * (5 + i) for i in range(n)]


def bench(url, n=8, concurrency=1, rate=math.inf, endpoint="completions", model="fake", extras=True, **kw):
    return asyncio.run(run_benchmark(url, model, prompts(n), K, concurrency, rate, endpoint, extras, 0,
                                     progress=False, **kw))


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def test_counts_latencies_and_goodput(server):
    for c in (1, 4):
        results = bench(server.url, concurrency=c)
        assert len(results) == 8
        for r in results:
            assert r.success, r.error
            assert r.output_tokens == K
            assert r.prompt_tokens == len(prompts(8)[r.index].split())  # from usage
            assert 0 < r.ttft < r.e2e
            assert len(r.itl) == K - 1
            assert r.tpot == pytest.approx((r.e2e - r.ttft) / (K - 1))
        duration = duration_of(results)
        s = summarize(results, duration, {"ttft": 10_000, "tpot": 10_000})
        assert s["completed"] == 8 and s["failed"] == 0
        assert s["total_output_tokens"] == 8 * K
        assert s["request_throughput"] == pytest.approx(8 / duration)
        assert s["output_throughput"] == pytest.approx(8 * K / duration)
        assert s["total_token_throughput"] > s["output_throughput"]
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            st = s[key]
            assert 0 < st["p50"] <= st["p90"] <= st["p99"], (key, st)
        assert s["ttft_ms"]["mean"] >= DELAY * 1000 * 0.9
        # easy SLO: every request is good; impossible SLO (TTFT < DELAY): none is
        assert s["good_requests"] == 8 and s["goodput"] == pytest.approx(s["request_throughput"])
        hard = summarize(results, duration, {"ttft": DELAY * 1000 / 4})
        assert hard["good_requests"] == 0 and hard["goodput"] == 0
        assert summarize(results, duration, {"e2e": 10_000, "tpot": DELAY * 1000 / 4})["good_requests"] == 0


def test_goodput_counts_only_requests_meeting_the_slo():
    def result(i, ttft, e2e, ok=True):
        return RequestResult(index=i, success=ok, output_tokens=11, ttft=ttft, e2e=e2e, itl=[0.01] * 10,
                             error="" if ok else "HTTP 500: x")

    results = [result(0, 0.1, 0.3), result(1, 0.6, 0.8), result(2, 0.1, 1.1), result(3, 0.05, 0.1, ok=False)]
    s = summarize(results, 2.0, {"ttft": 500, "tpot": 50})  # TPOTs: 20, 20, 100 ms
    assert s["good_requests"] == 1 and s["goodput"] == pytest.approx(0.5)
    assert s["completed"] == 3 and s["failed"] == 1 and s["errors"] == {"HTTP 500: x": 1}
    assert parse_goodput(["ttft:500", "tpot:50", "e2el:3000"]) == {"ttft": 500.0, "tpot": 50.0, "e2e": 3000.0}
    for bad in (["ttft"], ["foo:1"], ["ttft:-3"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)


def test_request_body_chat_extras_and_usage_fallback(server):
    server.received.clear()
    results = bench(server.url + "/v1/", n=3, concurrency=3, endpoint="chat", extras=False)
    assert all(r.success and r.output_tokens == K and r.text == "".join(f" t{i}" for i in range(K))
               for r in results)
    assert all(0 < r.ttft < r.e2e and r.ttft >= DELAY * 0.9 for r in results)  # role chunk is no token
    body = server.received[0]
    assert body["messages"][0]["role"] == "user" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True} and body["temperature"] == 0
    assert "ignore_eos" not in body and "min_tokens" not in body

    server.received.clear()
    tok = WordTokenizer()
    results = bench(server.url, n=3, concurrency=3, model="no-usage", tokenizer=tok)
    body = server.received[0]
    assert body["ignore_eos"] is True and body["min_tokens"] == K and body["max_tokens"] == K
    assert "prompt" in body and body["model"] == "no-usage"
    for r in results:  # no usage: tokens counted from chunks, prompt length from the tokenizer
        assert r.success and r.output_tokens == K
        assert r.prompt_tokens == len(prompts(3)[r.index].split())


def test_poisson_arrivals():
    assert arrival_times(4, math.inf, 0) == [0.0] * 4
    times = arrival_times(2000, 10.0, 7)
    assert times == arrival_times(2000, 10.0, 7) and times != arrival_times(2000, 10.0, 8)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert times[0] == 0 and min(gaps) > 0
    assert sum(gaps) / len(gaps) == pytest.approx(0.1, rel=0.1)  # mean gap 1/rate
    assert statistics.stdev(gaps) == pytest.approx(0.1, rel=0.15)  # exponential: stdev == mean


def test_request_rate_spaces_request_starts(server):
    schedule = arrival_times(6, 20.0, 0)
    results = bench(server.url, n=6, concurrency=6, rate=20.0)
    assert all(r.success for r in results)
    for r, at in zip(results, schedule):
        assert r.start >= at - 1e-3  # never before its arrival (later only by event-loop latency)
    assert results[-1].start >= 0.05


@pytest.mark.parametrize("model,status", [("fail-500", "HTTP 500"), ("fail-400", "HTTP 400"),
                                          ("stream-error", "stream error")])
def test_failing_server(server, model, status):
    results = bench(server.url, n=4, concurrency=2, model=model)
    s = summarize(results, duration_of(results), {"ttft": 1000})
    assert s["completed"] == 0 and s["failed"] == 4 and s["good_requests"] == 0
    assert all(status in r.error for r in results)
    assert s["ttft_ms"]["p50"] is None


def test_unreachable_server_fails_every_request():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    results = bench(f"http://127.0.0.1:{port}", n=2, concurrency=2)
    assert all(not r.success and "Connect" in r.error for r in results)


def test_run_from_args_writes_jsonl_and_png(server, fake_workload, tmp_path, capsys, monkeypatch):
    out = tmp_path / "res" / "serve.jsonl"
    args = parse(["--base-url", server.url, "--num-prompts", "6", "--max-concurrency", "3",
                  "--input-len", "10-20", "--output-len", str(K), "--goodput", "ttft:5000", "tpot:5000",
                  "--output", str(out)])
    assert run_from_args(args) == 0
    table = capsys.readouterr().out
    assert "TTFT" in table and "Goodput" in table and "Completed requests:" in table
    rec = json.loads(out.read_text())
    assert rec["model"] == "fake"  # first id of /v1/models
    assert rec["completed"] == 6 and rec["failed"] == 0 and rec["good_requests"] == 6
    assert rec["args"]["max_concurrency"] == 3 and rec["args"]["request_rate"] == "inf"
    assert rec["args"]["goodput"] == ["ttft:5000", "tpot:5000"] and rec["time"]
    assert rec["total_input_tokens"] > 0 and rec["total_output_tokens"] == 6 * K
    png = tmp_path / "res" / rec["plot"].split("/")[-1]
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    plot = tmp_path / "p.png"
    plotted = []
    monkeypatch.setattr(serve_bench, "write_plot", lambda results, path, title: plotted.append((path, title)))
    args = parse(["--base-url", server.url, "--model", "fake", "--endpoint", "chat", "--num-prompts", "2",
                  "--input-len", "5", "--output-len", "3", "--output", str(out), "--plot", str(plot),
                  "--request-rate", "50"])
    assert run_from_args(args) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 2  # appended
    assert json.loads(lines[1])["args"]["request_rate"] == 50.0 and json.loads(lines[1])["endpoint"] == "chat"
    assert plotted == [(plot, f"{server.url}  fake  concurrency 8, 50 req/s")]


def test_run_from_args_all_failed_returns_1(server, fake_workload, tmp_path, capsys):
    out = tmp_path / "serve.jsonl"
    args = parse(["--base-url", server.url, "--model", "fail-500", "--num-prompts", "3", "--input-len", "5-8",
                  "--output-len", "4", "--output", str(out)])
    assert run_from_args(args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "all 3 requests" in err and "HTTP 500" in err
    assert not out.exists()
