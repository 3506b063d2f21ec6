"""End to end: one server with two models (the default model twice, under two names and two
KV budgets) and the router behind "auto": dispatch, routing, overflow and headers."""
import re
import threading
import time

import httpx
import openai
import pytest

from server_util import running_server

DEFAULT = "smollm2-135m-instruct"
# Far on either side of the threshold for both signals (the probe, the default here, and the
# surface features it falls back to), so these tests check dispatch, not the classifier's taste.
HARD = "Write a Python function that merges overlapping intervals and explain its time complexity."
EASY = "Hi! What's the capital of France?"


@pytest.fixture(scope="module")
def server(default_model_folder):
    with running_server("--dtype", "float32",
                        "--model", f"small={DEFAULT},kv_cache_memory=48MiB",
                        "--model", f"big={DEFAULT},kv_cache_memory=96MiB,max_num_seqs=4",
                        "--router", "fast=small,strong=big", "--router-max-wait", "0") as (base, log):
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


def metric(base: str, name: str, **labels) -> float:
    """A sample's value by name and labels (in any order); 0 if absent."""
    for m in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", httpx.get(base + "/metrics").text, re.M):
        if dict(re.findall(r'(\w+)="([^"]*)"', m.group(1))) == labels:
            return float(m.group(2))
    return 0.0


def chat(base: str, model: str, content: str, **extra) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4,
            "temperature": 0, **extra}
    return httpx.post(base + "/v1/chat/completions", json=body, timeout=120)


def test_models_lists_both_and_auto(client, server):
    assert [m.id for m in client.models.list().data] == ["small", "big", "auto"]
    assert httpx.get(server + "/v1/models/auto").json()["routes_to"] == {"fast": "small", "strong": "big"}
    # Each model has its own KV budget: 96 MiB holds twice the blocks of 48 MiB.
    total = {m: metric(server, "tuili_kv_blocks_free", model=m) for m in ("small", "big")}
    assert total["big"] == pytest.approx(2 * total["small"], rel=0.01)


def test_each_request_is_served_by_the_engine_it_names(client, server):
    before = {m: metric(server, "tuili_prompt_tokens_total", model=m) for m in ("small", "big")}
    r = client.chat.completions.create(model="big", messages=[{"role": "user", "content": EASY}], max_tokens=3)
    assert r.model == "big"
    mid = {m: metric(server, "tuili_prompt_tokens_total", model=m) for m in ("small", "big")}
    assert mid["big"] > before["big"] and mid["small"] == before["small"]
    r = client.completions.create(model="small", prompt="The sea is", max_tokens=3)
    assert r.model == "small"
    assert metric(server, "tuili_prompt_tokens_total", model="small") > mid["small"]
    assert chat(server, "nope", EASY).status_code == 404


def test_auto_routes_by_the_classifier_with_header(server):
    hard = chat(server, "auto", HARD)
    assert hard.status_code == 200 and hard.json()["model"] == "big"
    assert hard.headers["x-tuili-routed-to"] == "big"
    easy = chat(server, "auto", EASY)
    assert easy.json()["model"] == "small" and easy.headers["x-tuili-routed-to"] == "small"
    with httpx.stream("POST", server + "/v1/chat/completions", timeout=120, json={
            "model": "auto", "stream": True, "max_tokens": 3,
            "messages": [{"role": "user", "content": HARD}]}) as r:
        assert r.headers["x-tuili-routed-to"] == "big"
        assert '"model": "big"' in "".join(r.iter_lines())
    assert metric(server, "tuili_router_decisions_total", reason="classifier_strong", model="big") >= 2
    assert metric(server, "tuili_router_decisions_total", reason="classifier_fast", model="small") >= 1
    bad = httpx.post(server + "/v1/completions", json={"model": "auto", "prompt": [1, 2, 3]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"


def test_auto_reads_the_fast_models_probe_and_computes_the_prompt_once(server):
    used = metric(server, "tuili_router_probe_total", outcome="used")
    looked_up = {m: metric(server, "tuili_prefix_cache_query_tokens", model=m) for m in ("small", "big")}
    easy = chat(server, "auto", "Say hello to my friend Tom, who is visiting from Lisbon this week.")
    assert easy.status_code == 200 and easy.json()["model"] == "small"
    assert easy.headers["x-tuili-route-reason"] == "classifier_fast"
    assert metric(server, "tuili_router_probe_total", outcome="used") == used + 1
    # The probe read the answer's own prefill: the fast engine took the prompt once, the strong none.
    prompt = easy.json()["usage"]["prompt_tokens"]
    assert metric(server, "tuili_prefix_cache_query_tokens", model="small") - looked_up["small"] == prompt
    assert metric(server, "tuili_prefix_cache_query_tokens", model="big") == looked_up["big"]
    # Sent strong, the fast call is dropped: not counted as a request of the fast model, nothing left running.
    requests = metric(server, "tuili_request_finished_total", model="small", finish_reason="abort")
    hard = chat(server, "auto", HARD)
    assert hard.json()["model"] == "big" and metric(server, "tuili_router_probe_total", outcome="used") == used + 2
    assert metric(server, "tuili_request_finished_total", model="small", finish_reason="abort") == requests
    deadline = time.monotonic() + 10  # the abort reaches the engine loop on its next turn
    while metric(server, "tuili_requests_running", model="small") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(server, "tuili_requests_running", model="small") == 0


def test_overflow_to_fast_while_strong_is_busy_but_explicit_stays(server):
    busy = threading.Event()
    done = threading.Event()

    def long_request():
        body = {"model": "big", "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", server + "/v1/completions", json=body, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    busy.set()
                if done.is_set():
                    break

    t = threading.Thread(target=long_request)
    t.start()
    try:
        assert busy.wait(120)
        routed = chat(server, "auto", HARD)
        assert routed.json()["model"] == "small" and routed.headers["x-tuili-routed-to"] == "small"
        assert metric(server, "tuili_router_decisions_total", reason="overflow", model="small") >= 1
        explicit = chat(server, "big", HARD)
        assert explicit.json()["model"] == "big" and explicit.headers["x-tuili-routed-to"] == "big"
    finally:
        done.set()
        t.join(timeout=120)
