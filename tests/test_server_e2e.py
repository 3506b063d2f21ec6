"""End to end: a live `tuili serve` with the default model, driven by the official openai client."""
import asyncio
import json
import re
import time

import httpx
import openai
import pytest

from server_util import running_server

MODEL = "smollm2-135m-instruct"
CHAT = [{"role": "user", "content": "Write three sentences about the sea."}]


@pytest.fixture(scope="module")
def server(default_model_folder):
    with running_server("--dtype", "float32", "--kv-cache-memory", "256MiB", "--max-num-seqs", "64") as (base, log):
        yield base, log


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def kv_used(base: str) -> float:
    text = httpx.get(base + "/metrics").text
    return float(re.search(r'^tuili_kv_blocks_used\{model="[^"]+"\} (\S+)', text, re.M).group(1))


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server[0] + "/health").json() == {"status": "ok"}


def test_chat_completion_shape_and_usage(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == MODEL
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_equals_non_stream_chat(client):
    kw = dict(model=MODEL, messages=CHAT, max_tokens=24, temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_stream_equals_non_stream_completions(client):
    kw = dict(model=MODEL, prompt="The three primary colors are", max_tokens=20, temperature=0)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_usage_in_chat_stream(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and 0 < usage.completion_tokens <= 10
    streamed = sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
    assert streamed <= usage.completion_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_stop_string_cuts_text(client):
    kw = dict(model=MODEL, prompt="Count: one, two, three, four, five,", max_tokens=24, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    words = [w for w in re.split(r"(\s+)", full) if w.strip()]
    assert len(words) >= 3, full
    stop = words[2]
    cut = full[: full.index(stop)]
    for stream in (False, True):
        if stream:
            chunks = list(client.completions.create(**kw, stop=[stop, "@@never@@"], stream=True))
            text = "".join(c.choices[0].text for c in chunks)
            reason = [c.choices[0].finish_reason for c in chunks][-1]
        else:
            r = client.completions.create(**kw, stop=[stop, "@@never@@"])
            text, reason = r.choices[0].text, r.choices[0].finish_reason
        assert text == cut and reason == "stop"


def test_n2_gives_two_indexed_choices(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, n=2, temperature=1.0, seed=7)
    assert sorted(c.index for c in r.choices) == [0, 1]
    again = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, n=2, temperature=1.0, seed=7)
    assert [c.message.content for c in r.choices] == [c.message.content for c in again.choices]
    assert r.choices[0].message.content != r.choices[1].message.content


def test_completion_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="Paris is the capital of", max_tokens=5,
                                  temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text or r.choices[0].finish_reason == "stop"
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and chosen <= 0
        assert max(top.values()) == pytest.approx(chosen, abs=1e-4)  # greedy: the chosen is the top-1


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)


def test_32_concurrent_streams_complete(server):
    async def one(client, i):
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Tell me fact number {i} about cats."}],
            max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True})
        text, usage = "", None
        async for c in stream:
            if c.choices:
                text += c.choices[0].delta.content or ""
            if c.usage:
                usage = c.usage
        return text, usage

    async def main():
        client = openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key="x", max_retries=0, timeout=300)
        return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(main())
    assert len(results) == 32
    assert all(text and usage and 0 < usage.completion_tokens <= 16 for text, usage in results)


def test_disconnect_mid_stream_returns_blocks(server):
    base = server[0]
    before = kv_used(base)
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = 0
        for line in lines:
            if line.startswith("data: {"):
                got += 1
            if got >= 20:
                break
        during = kv_used(base)
    assert during > before
    deadline = time.monotonic() + 30
    while kv_used(base) != before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert kv_used(base) == before


def test_request_log_line_and_header(server):
    base, log = server
    r = httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 3})
    rid = r.headers["x-request-id"]
    assert r.status_code == 200 and r.json()["id"] == f"cmpl-{rid}"
    time.sleep(0.2)
    lines = [line for line in open(log) if f"request_id=cmpl-{rid}" in line]
    assert len(lines) == 1
    assert "prompt_tokens=" in lines[0] and "completion_tokens=3" in lines[0] and "finish=length" in lines[0]
    metrics = httpx.get(base + "/metrics").text
    assert 'tuili_requests_total{endpoint="/v1/completions",status="200"}' in metrics
    assert "tuili_time_to_first_token_seconds_bucket" in metrics


BAD_REQUESTS = [
    # (path, raw body or json, expected status, expected param or None)
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"[1, 2, 3]", 400, None),
    ("/v1/chat/completions", {"messages": CHAT}, 400, "model"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "temperature": -1}, 400, "temperature"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "top_p": 2}, 400, "top_p"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "n": 0}, 400, "n"),
    ("/v1/chat/completions", {"model": "no-such-model", "messages": CHAT}, 404, "model"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, None),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "stop": 5}, 400, None),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "top_logprobs": 3}, 400, "top_logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "x " * 9000}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [99999999]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 10}, 400, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": []}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("/v1/no-such-route", {"model": MODEL}, 404, None),
]


def test_bad_requests_get_openai_errors_and_server_keeps_serving(server, client):
    base = server[0]
    for path, body, status, param in BAD_REQUESTS:
        if isinstance(body, bytes):
            r = httpx.post(base + path, content=body, headers={"Content-Type": "application/json"})
        else:
            r = httpx.post(base + path, json=body)
        assert r.status_code == status, (path, body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text
        if param is not None:
            assert err["param"] == param, (body, err)
    long = httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": "x " * 9000}).json()
    assert re.search(r"9\d{3} tokens", long["error"]["message"]) and "8192" in long["error"]["message"]
    assert httpx.get(base + "/v1/completions").status_code == 405
    # Through the client too.
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=CHAT, presence_penalty=5)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-nothing", prompt="hi")
    # And a normal request still works.
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)
    assert r.choices[0].message.content


def test_api_key_and_queue_limit(default_model_folder):
    with running_server("--dtype", "float32", "--kv-cache-memory", "128MiB", "--api-key", "sekret",
                        "--max-num-seqs", "1", "--max-queue", "1") as (base, _):
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
        assert httpx.post(base + "/v1/completions", json=body).status_code == 401
        bad = httpx.post(base + "/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"
        assert httpx.get(base + "/health").status_code == 200  # health needs no key
        auth = {"Authorization": "Bearer sekret"}
        assert httpx.post(base + "/v1/completions", json=body, headers=auth, timeout=120).status_code == 200

        async def burst():
            long = {"model": MODEL, "prompt": "Hello", "max_tokens": 64, "ignore_eos": True}
            async with httpx.AsyncClient(timeout=120, headers=auth) as c:
                return await asyncio.gather(*(c.post(base + "/v1/completions", json=long) for _ in range(6)))

        codes = sorted(r.status_code for r in asyncio.run(burst()))
        assert 429 in codes and 200 in codes, codes
        limited = [r for r in asyncio.run(burst()) if r.status_code == 429]
        assert limited and json.loads(limited[0].text)["error"]["code"] == "queue_full"
        assert httpx.post(base + "/v1/completions", json=body, headers=auth, timeout=120).status_code == 200
