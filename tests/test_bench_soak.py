"""`tuili bench soak`: the request mix, the gauges it reads, its report and PASS/FAIL verdict.

Most tests run against a fake OpenAI-style server in a thread (strict about types like
OpenAI, with /metrics gauges the test sets), so they check the client's bookkeeping
without a model. The last one soaks a live `tuili serve` (slow: minutes on a shared CPU).
"""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from server_util import app_in_thread, fake_openai_app, running_server
from tuili.bench.soak import (Gauges, SoakResult, add_arguments, build_report, parse_gauges, run_from_args,
                              run_soak, verdict)
from tuili.bench.soak_plan import MALFORMED, make_plan
from tuili.config import DEFAULT_MODEL

GiB = 2**30


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                   "code": None}}, status_code=status)


def make_app(state: SimpleNamespace) -> FastAPI:
    async def handle(request: Request, chat: bool):
        try:
            body = json.loads(await request.body())
        except ValueError:
            return error(400, "body: not JSON")
        if not isinstance(body, dict):
            return error(400, "body: not an object")
        if body.get("model") != "fake":
            return error(404, "model: not found")
        n, stream = body.get("max_tokens"), body.get("stream", False)
        if type(n) is not int or not 1 <= n <= 1000 or type(stream) is not bool:
            return error(400, "max_tokens or stream: wrong type or range")
        if type(body.get("temperature", 0.0)) not in (int, float):
            return error(400, "temperature: not a number")
        key = "messages" if chat else "prompt"
        if not isinstance(body.get(key), (list if chat else str)):
            return error(400, f"{key}: missing or wrong type")
        state.kv += state.leak  # blocks a leaky server never gives back
        if state.fail:
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, status_code=500)

        async def events():
            for i in range(3):
                await asyncio.sleep(0.005)
                choice = {"index": 0, "delta": {"content": f" t{i}"}} if chat else {"index": 0, "text": f" t{i}"}
                yield "data: " + json.dumps({"choices": [choice]}) + "\n\n"
            yield "data: [DONE]\n\n"

        if stream:
            return StreamingResponse(events(), media_type="text/event-stream")
        return {"choices": [{"index": 0, "text": " t0 t1 t2", "finish_reason": "length"}]}

    app = fake_openai_app(handle)

    @app.get("/metrics")
    async def metrics():
        lines = ["# TYPE tuili_kv_blocks_used gauge", f'tuili_kv_blocks_used{{model="fake"}} {state.kv}']
        if state.rss is not None:
            lines += ["# TYPE process_resident_memory_bytes gauge", f"process_resident_memory_bytes {state.rss}"]
        state.rss = state.rss and state.rss + state.rss_step
        return PlainTextResponse("\n".join(lines) + "\n")

    return app


@pytest.fixture(scope="module")
def fake():
    state = SimpleNamespace(kv=0, leak=0, rss=GiB, rss_step=0, fail=False)
    with app_in_thread(make_app(state)) as url:
        yield SimpleNamespace(url=url, state=state)


@pytest.fixture
def state(fake):
    fake.state.__dict__.update(kv=0, leak=0, rss=GiB, rss_step=0, fail=False)
    return fake.state


def test_plan_is_seeded_and_mixed():
    plan = make_plan(2000, "m", seed=3)
    assert [r.content() for r in plan] == [r.content() for r in make_plan(2000, "m", seed=3)]
    assert [r.content() for r in plan] != [r.content() for r in make_plan(2000, "m", seed=4)]
    malformed = [r for r in plan if r.malformed]
    abandoned = [r for r in plan if r.abandon]
    assert 0.03 < len(malformed) / 2000 < 0.07 and 0.17 < len(abandoned) / 2000 < 0.23
    assert all(r.stream and not r.malformed for r in abandoned)
    assert {r.malformed for r in malformed} == set(MALFORMED)
    good = [r for r in plan if not r.malformed]
    assert {(r.endpoint, r.stream) for r in good} == {("chat", True), ("chat", False), ("completions", True),
                                                      ("completions", False)}
    assert all(r.body["model"] == "m" and 4 <= r.body["max_tokens"] <= 48 for r in good)
    bad_json = next(r for r in malformed if r.malformed == "bad_json")
    with pytest.raises(ValueError):
        json.loads(bad_json.content())


def test_parse_gauges_sums_models():
    text = ("# TYPE tuili_kv_blocks_used gauge\ntuili_kv_blocks_used{model=\"a\"} 3.0\n"
            "tuili_kv_blocks_used{model=\"b\"} 2.0\n# TYPE process_resident_memory_bytes gauge\n"
            "process_resident_memory_bytes 1.5e9\n# TYPE tuili_kv_blocks_free gauge\ntuili_kv_blocks_free 7\n")
    assert parse_gauges(text) == Gauges(5.0, 1.5e9)
    assert parse_gauges("# TYPE other gauge\nother 1\n") == Gauges(None, None)


def results(*outcomes: tuple[str, int | None, str, bool]) -> list[SoakResult]:
    return [SoakResult(i, malformed, abandon, status, outcome) for i, (outcome, status, malformed, abandon)
            in enumerate(outcomes)]


GOOD_RUN = [("completed", 200, "", False)] * 6 + [("abandoned", 200, "", True)] * 2 + [
    ("refused", 400, "bad_json", False), ("refused", 404, "unknown_model", False), ("completed", 200, "stream_string", False)]


def test_report_and_verdict_of_a_good_run():
    report = build_report(results(*GOOD_RUN), Gauges(0, GiB), Gauges(0, 1.2 * GiB), Gauges(0, 1.23 * GiB))
    assert report["requests"] == 11 and report["completed"] == 6 and report["good_requests"] == 6
    assert report["abandoned"] == 2 and report["abandon_planned"] == 2
    assert report["malformed"] == 3 and report["malformed_answered_4xx"] == 2
    assert report["malformed_accepted"] == ["stream_string"]
    assert report["status_counts"] == {"200": 9, "400": 1, "404": 1}
    assert report["errors_by_status"] == {"400": 1, "404": 1} and report["server_errors"] == 0
    assert report["rss_growth_after_warmup"] == pytest.approx(0.025)
    assert report["missing_metrics"] == []
    assert verdict(report) == []


@pytest.mark.parametrize("change,reason", [
    (dict(extra=[("refused", 500, "", False), ("refused", 503, "", False)]), "2 responses with status >= 500"),
    (dict(extra=[("transport_error", None, "", False)]), "1 good requests ended in transport_error"),
    (dict(extra=[("stream_error", 200, "", False)]), "1 good requests ended in stream_error"),
    (dict(end=Gauges(3, 1.2 * GiB)), "KV blocks in use 3 after the run, 0 before"),
    (dict(end=Gauges(None, 1.2 * GiB)), "KV blocks in use: not in /metrics"),
    (dict(end=Gauges(0, 1.27 * GiB)), "RSS grew 5.8% after the warm-up (limit 5%)"),
    (dict(end=Gauges(0, None)), "RSS: process_resident_memory_bytes not in /metrics"),
])
def test_verdict_fails(change, reason):
    rs = results(*GOOD_RUN, *change.get("extra", []))
    report = build_report(rs, Gauges(0, GiB), Gauges(0, 1.2 * GiB), change.get("end", Gauges(0, 1.2 * GiB)))
    assert verdict(report) == [reason]


def soak_args(url: str, *extra: str):
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(["--base-url", url, "--requests", "80", "--concurrency", "4", "--warmup", "4",
                         "--settle", "0.5", *extra])


def test_soak_against_a_fake_server_passes(fake, state, capsys):
    report = asyncio.run(run_soak(fake.url, "fake", 80, 4, seed=1, warmup=4, settle_s=0.5))
    assert report["requests"] == 80 and report["completed"] == report["good_requests"] > 0
    assert report["abandoned"] == report["abandon_planned"] > 0
    assert report["malformed_answered_4xx"] == report["malformed"] > 0
    assert report["failures_without_status"] == {} and report["server_errors"] == 0
    assert report["kv_blocks_used"] == {"before": 0, "after": 0}
    assert run_from_args(soak_args(fake.url + "/v1")) == 0  # model from /v1/models
    assert capsys.readouterr().out.strip().splitlines()[-1] == "PASS"


def test_soak_fails_on_500s_leaks_and_memory_growth(fake, state, capsys):
    state.fail, state.rss_step = True, GiB // 10
    assert run_from_args(soak_args(fake.url, "--json", "--model", "fake")) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["server_errors"] == report["good_requests"] + report["abandon_planned"]
    assert report["errors_by_status"]["500"] == report["server_errors"]
    reasons = report["verdict"]["reasons"]
    assert not report["verdict"]["pass"] and reasons[0].endswith("responses with status >= 500")
    assert reasons[-1].startswith("RSS grew")
    state.fail, state.rss_step, state.leak = False, 0, 1
    assert run_from_args(soak_args(fake.url, "--model", "fake")) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("FAIL: KV blocks in use ") and last.endswith(" before")


@pytest.mark.slow
def test_soak_a_live_server():
    with running_server("--dtype", "float32", "--kv-cache-memory", "64MiB") as (base, _):
        report = asyncio.run(run_soak(base, DEFAULT_MODEL, 30, 4, seed=0, warmup=2, settle_s=10))
    reasons = verdict(report)
    assert reasons == [], (reasons, report)
    assert report["completed"] == report["good_requests"]
    assert report["malformed_answered_4xx"] == report["malformed"]
