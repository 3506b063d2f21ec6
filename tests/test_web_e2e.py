"""The chat page and the dashboard in a real browser: Debian's chromium, headless, driven
by Playwright against a live `tuili serve` with two models (the default model twice, under
two names) and the router behind "auto".

What a person would do: ask a question and watch the answer stream in; stop a long answer
and see the server free its KV blocks; ask "auto" and see which model answered and why;
watch the dashboard's token counter move; and never see model text run as markup. The
key prompt and the error messages are driven with the page's requests answered by the test
(Playwright's page.route), so they cost no server start.

The browser is not optional: without Playwright or /usr/bin/chromium these tests fail and
say what is missing (`make test` installs both).
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import httpx
import pytest

from server_util import running_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
DEFAULT = "smollm2-135m-instruct"
# Far above the threshold for the probe (the default signal here) and the surface features alike.
HARD = "Write a Python function that merges overlapping intervals and explain its time complexity."
EASY = "Hi! What's the capital of France?"
XSS = "<img src=x onerror=alert(1)>"
WEB = Path(__file__).resolve().parents[1] / "src" / "tuili" / "web"


def require_browser():
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the Python package 'playwright' (the dev extras pin it: pip install -e '.[dev]')")
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(f"Debian's chromium at {CHROMIUM} (as root: apt-get install chromium; `make test` does it)")
    if missing:
        pytest.fail("the browser test cannot run; missing: " + "; ".join(missing), pytrace=False)


@pytest.fixture(scope="module")
def server(default_model_folder):
    require_browser()
    with running_server("--dtype", "float32", "--max-model-len", "1024",
                        "--model", f"small={DEFAULT},kv_cache_memory=48MiB",
                        "--model", f"big={DEFAULT},kv_cache_memory=48MiB",
                        "--router", "fast=small,strong=big") as (base, _):
        yield base


@pytest.fixture(scope="module")
def browser():
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    """A fresh page (its own local storage); fails the test on an uncaught script error, a
    CSP refusal, or any alert/confirm dialog."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=server)
    context.set_default_timeout(60_000)
    pg = context.new_page()
    trouble: list[str] = []
    pg.on("pageerror", lambda e: trouble.append(f"script error: {e}"))
    pg.on("console", lambda m: trouble.append(f"console: {m.text}") if "Content Security Policy" in m.text else None)

    def on_dialog(d):
        trouble.append(f"{d.type} dialog: {d.message}")
        d.dismiss()

    pg.on("dialog", on_dialog)
    yield pg
    context.close()
    assert not trouble, trouble


def metric(base: str, name: str, **labels) -> float:
    """A sample's value by name and exact labels; 0 if absent."""
    for m in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", httpx.get(base + "/metrics").text, re.M):
        if dict(re.findall(r'(\w+)="([^"]*)"', m.group(1))) == labels:
            return float(m.group(2))
    return 0.0


def open_chat(page, model: str, max_tokens: int, temperature: float = 0.0):
    page.goto("/")
    page.wait_for_selector(f"#model option[value='{model}']", state="attached")
    page.select_option("#model", model)
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#temperature", str(temperature))


def ask(page, text: str):
    """Types a question, sends it with Enter; returns the locator of the answer."""
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    return page.locator("#messages li.msg.assistant").last


def sse(*pieces: str, model: str = "small") -> str:
    """A canned chat stream in the server's shape, for page.route."""
    def chunk(delta, finish=None):
        return {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    events = [chunk({"role": "assistant", "content": ""})] + [chunk({"content": p}) for p in pieces]
    events.append(chunk({}, "stop"))
    events.append({"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": model,
                   "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": len(pieces),
                                            "total_tokens": 5 + len(pieces)}})
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def test_pages_assets_and_stats_are_served_safely(server):
    for path in ("/", "/dashboard"):
        r = httpx.get(server + path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        scripts = re.findall(r"<script([^>]*)>(.*?)</script>", r.text, re.S)
        assert scripts and all('src="/web/' in attrs and not body.strip() for attrs, body in scripts)
        assert "http://" not in r.text and "https://" not in r.text  # nothing from another origin
    r = httpx.get(server + "/web/chat.js")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript")
    assert httpx.get(server + "/web/..%2Fserve%2Fweb.py").status_code == 404
    assert httpx.get(server + "/web/nothing.js").status_code == 404
    assets = [p for p in WEB.iterdir() if p.suffix in (".html", ".js", ".css", ".svg")]
    assert sum(p.stat().st_size for p in assets) < 300_000
    s = httpx.get(server + "/v1/stats").json()
    assert [m["name"] for m in s["models"]] == ["small", "big"]
    assert s["router"]["name"] == "auto" and s["router"]["fast"] == "small"
    assert s["kv"]["device"]["total"] > 0 and set(s["prefix"]) >= {"device", "host", "disk"}
    assert s["in_flight"]["per_request"] is False


def test_chat_streams_an_answer_and_keeps_the_conversation(page):
    open_chat(page, "small", 24)
    answer = ask(page, "Name three colors.")
    page.wait_for_selector("#messages li.msg.assistant[data-state='done']")
    assert answer.locator(".body").inner_text().strip()
    assert int(answer.get_attribute("data-chunks")) > 1  # it came in pieces
    meta = answer.locator(".meta").inner_text()
    assert "TTFT" in meta and "tok/s" in meta and re.search(r"\d+ prompt \+ \d+ answer = \d+ tokens", meta)
    assert answer.locator(".who").inner_text() == "small"
    page.reload()  # the conversation is kept in the browser
    page.wait_for_selector("#messages li.msg.user")
    assert page.locator("#messages li.msg.user .body").inner_text() == "Name three colors."
    assert page.locator("#conversations li").count() == 1


def test_stop_aborts_the_request_and_frees_its_kv_blocks(page, server):
    def finished(reason):
        return metric(server, "tuili_request_finished_total", model="small", finish_reason=reason)

    natural = {r: finished(r) for r in ("stop", "length")}
    open_chat(page, "small", 900, temperature=0.8)
    answer = ask(page, "Write a very long story about a dragon who learns to bake bread. Use many chapters.")
    page.wait_for_function("() => { const li = [...document.querySelectorAll('#messages li.msg.assistant')].pop();"
                           " return li && Number(li.dataset.chunks) >= 8; }")
    assert metric(server, "tuili_kv_blocks_used", model="small") > 0  # the answer holds blocks now
    page.keyboard.press("Escape")
    page.wait_for_selector("#messages li.msg.assistant[data-state='stopped']")
    assert "stopped" in answer.locator(".meta").inner_text()
    assert page.locator("#send").is_enabled() and page.locator("#stop").is_disabled()
    # Up to 900 tokens were asked for; the server ends the request as the connection closes.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        small = httpx.get(server + "/v1/stats").json()["models"][0]
        if small["kv"]["device"]["used"] == 0 and small["calls_in_flight"] == 0 and small["running"] == 0:
            break
        time.sleep(0.2)
    assert metric(server, "tuili_kv_blocks_used", model="small") == 0
    assert small["calls_in_flight"] == 0 and small["running"] == 0
    assert {r: finished(r) for r in ("stop", "length")} == natural  # it did not run to its end


def test_auto_names_the_model_that_answered_and_why(page):
    open_chat(page, "auto", 4)
    for text, model, reason in ((HARD, "big", "classifier_strong"), (EASY, "small", "classifier_fast")):
        page.click("#new-chat")  # a conversation each: the router reads the whole conversation
        answer = ask(page, text)
        page.wait_for_function("() => [...document.querySelectorAll('#messages li.msg.assistant')].pop()"
                               ".dataset.state === 'done'")
        assert answer.locator(".who").inner_text() == model
        assert answer.locator(".routed").inner_text() == f"auto → {model} ({reason})"
    assert page.locator("#conversations li").count() == 2
    page.locator("#conversations .conv-title", has_text="merges overlapping").click()  # back to the first one
    assert page.locator("#messages li.msg.assistant .who").inner_text() == "big"


def test_dashboard_shows_the_token_counter_move(page, server):
    page.goto("/dashboard")
    page.wait_for_selector("#status[data-ok='true']")
    before = page.locator("#total-output-tokens").inner_text()
    body = {"model": "small", "messages": [{"role": "user", "content": EASY}], "max_tokens": 6, "temperature": 0}
    assert httpx.post(server + "/v1/chat/completions", json=body, timeout=120).status_code == 200
    page.wait_for_function("(b) => document.getElementById('total-output-tokens').textContent !== b", arg=before,
                           timeout=15_000)
    assert int(page.locator("#total-output-tokens").inner_text()) > int(before)
    assert page.locator("canvas").count() == 6
    assert page.locator("#models-table tbody tr").count() == 2
    assert page.locator("#router-table tbody tr").count() >= 1
    assert "not per-request progress" in page.locator("#flight-note").inner_text()


def test_model_text_never_becomes_markup(page):
    payload = ["Here: ", XSS[:9], XSS[9:], " and <script>window.pwned=1</script>\n\n",
               "```html\n<img src=x onerror=alert(2)>\n```\n", "[link](javascript:alert(3)) **bold**"]
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=sse(*payload)))
    open_chat(page, "small", 16)
    answer = ask(page, XSS)  # the user's own text too
    page.wait_for_selector("#messages li.msg.assistant[data-state='done']")
    text = answer.locator(".body").inner_text()
    assert XSS in text and "<script>window.pwned=1</script>" in text
    assert page.locator("#messages li.msg.user .body").inner_text() == XSS
    assert page.locator("#messages img, #messages script").count() == 0
    assert page.locator("#messages a").count() == 0  # a javascript: link stays text
    assert answer.locator("pre code").inner_text().strip() == "<img src=x onerror=alert(2)>"
    assert answer.locator("strong").inner_text() == "bold"
    assert page.evaluate("() => window.pwned === undefined")


def test_api_key_prompt_and_clear_errors(page):
    open_chat(page, "small", 100_000)
    answer = ask(page, "Hello")  # the server refuses: max_tokens beyond the context
    page.wait_for_selector("#messages li.msg.assistant[data-state='error']")
    error = answer.locator(".error").inner_text()
    assert "400" in error and "max_tokens" in error

    seen = []

    def needs_key(route):
        auth = route.request.headers.get("authorization", "")
        seen.append(auth)
        if auth != "Bearer sekrit":
            route.fulfill(status=401, content_type="application/json", body=json.dumps({"error": {
                "message": "Incorrect or missing API key.", "type": "authentication_error", "param": None,
                "code": "invalid_api_key"}}))
        else:
            route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=sse("hello ", "there"))

    page.route("**/v1/chat/completions", needs_key)
    page.fill("#max-tokens", "8")
    answer = ask(page, "Hello again")
    page.wait_for_selector("#key-dialog[open]")
    assert "Incorrect or missing API key" in page.locator("#key-reason").inner_text()
    page.fill("#key-input", "sekrit")
    page.click("#key-ok")
    page.wait_for_function("() => [...document.querySelectorAll('#messages li.msg.assistant')].pop()"
                           ".dataset.state === 'done'")
    assert seen == ["", "Bearer sekrit"]
    assert answer.locator(".body").inner_text() == "hello there"

    page.unroute("**/v1/chat/completions")
    page.route("**/v1/chat/completions", lambda route: route.abort("connectionrefused"))
    answer = ask(page, "Are you there?")
    page.wait_for_function("() => [...document.querySelectorAll('#messages li.msg.assistant')].pop()"
                           ".dataset.state === 'error'")
    assert "Cannot reach the server" in answer.locator(".error").inner_text()


def test_stats_windows_come_from_counter_deltas():
    """No browser: /v1/stats' last-minute figures are deltas between readings of the counters."""
    from types import SimpleNamespace

    from tuili.serve.metrics import Metrics
    from tuili.serve.web import History, build_stats, quantile

    inf = float("inf")
    assert quantile(0.5, [0.1, 0.5, 1.0, inf], [0, 10, 10, 10]) == pytest.approx(0.3)
    assert quantile(0.99, [0.1, 0.5, 1.0, inf], [0, 0, 0, 5]) == 1.0  # past the last bound: the last bound
    assert quantile(0.5, [0.1, inf], [0, 0]) is None

    stats = {"running": 1, "waiting": 2, "kv_blocks_used": 3, "kv_blocks_free": 5, "kv_blocks_total": 8,
             "preemptions": 0, "prefix_hit_tokens": 0, "prefix_query_tokens": 100, "prefix_hit_tokens_device": 40,
             "prefix_hit_tokens_host": 10, "prefix_hit_tokens_disk": 0, "kv_host_blocks": 4, "calls_in_flight": 1}
    engine = SimpleNamespace(stats=lambda: dict(stats))
    registry = SimpleNamespace(all=lambda: [SimpleNamespace(name="m", engine=engine, max_model_len=64, created=0)])
    metrics, history = Metrics(), History()
    metrics.observe_request("m", 10, 5, ttft=0.02, e2e=0.1, finish_reasons=["stop"])
    first = build_stats(registry, metrics, None, history, now=100.0)
    assert first["window_s"] is None and first["latency"]["ttft"]["count"] == 1  # since start
    assert first["prefix"]["device"]["hit_rate"] == 0.4 and first["kv"]["host"]["blocks"] == 4
    for _ in range(3):
        metrics.observe_request("m", 10, 5, ttft=3.0, e2e=4.0, finish_reasons=["stop"])
    stats["prefix_query_tokens"], stats["prefix_hit_tokens_device"] = 200, 140
    later = build_stats(registry, metrics, None, history, now=130.0)
    assert later["window_s"] == 30.0 and later["latency"]["ttft"]["count"] == 3  # only the new ones
    assert 2.5 <= later["latency"]["ttft"]["p50"] <= 5.0
    assert later["rates"]["output_tokens_per_s"] == pytest.approx(15 / 30)
    assert later["prefix"]["device"]["window_hit_rate"] == pytest.approx(1.0)
    assert later["totals"] == {"prompt_tokens": 40, "output_tokens": 20, "requests_finished": 4}
    assert later["in_flight"]["by_model"] == [{"model": "m", "calls": 1, "running": 1, "waiting": 2}]
