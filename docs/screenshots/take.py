"""Remake the screenshots of the chat page and the dashboard (desktop 1280x800, phone 390x844).

    .venv/bin/python docs/screenshots/take.py

Starts `tuili serve` with the default model twice (small, big) behind the router "auto",
has a short real conversation through the page, sends some traffic for the dashboard's
charts, and writes chat-desktop.png, chat-phone.png, dashboard-desktop.png and
dashboard-phone.png beside this file. Needs what tests/test_web_e2e.py needs: Playwright
and Debian's chromium.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

HERE = Path(__file__).resolve().parent
os.environ.setdefault("TUILI_CACHE", str(HERE.parents[1] / ".venv" / "tuili-cache"))  # as the tests have it
sys.path.insert(0, str(HERE.parents[1] / "tests"))
from server_util import running_server  # noqa: E402
from test_web_e2e import CHROMIUM, CHROMIUM_ARGS, DEFAULT  # noqa: E402

DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
QUESTIONS = ["Write a Python function that returns the square of a number, in a code block.",
             "What is the capital of France? Answer in one sentence."]


def traffic(base: str, stop: threading.Event) -> None:
    prompts = ["Tell me a fact about the sea.", "Count to five.", "Prove that the square root of two is irrational. "
               "Think step by step and justify every inequality."]
    k = 0
    while not stop.is_set():
        body = {"model": "auto", "messages": [{"role": "user", "content": prompts[k % len(prompts)]}],
                "max_tokens": 24, "temperature": 0.7}
        httpx.post(base + "/v1/chat/completions", json=body, timeout=120)
        k += 1


def chat(page) -> None:
    page.goto("/")
    page.wait_for_selector("#model option[value='auto']", state="attached")
    page.select_option("#model", "auto")
    page.fill("#max-tokens", "80")
    page.fill("#temperature", "0")
    for q in QUESTIONS:
        page.fill("#prompt", q)
        page.press("#prompt", "Enter")
        page.wait_for_function("() => [...document.querySelectorAll('#messages li.msg.assistant')].pop()"
                               ".dataset.state !== 'streaming'", timeout=120_000)


def main() -> None:
    with running_server("--dtype", "float32", "--max-model-len", "1024",
                        "--model", f"small={DEFAULT},kv_cache_memory=48MiB",
                        "--model", f"big={DEFAULT},kv_cache_memory=48MiB",
                        "--router", "fast=small,strong=big") as (base, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        desk = browser.new_context(viewport=DESKTOP, base_url=base)
        dash = desk.new_page()
        dash.goto("/dashboard")
        page = desk.new_page()
        chat(page)  # first, alone, so the page can tell the router's reason
        stop = threading.Event()
        sender = threading.Thread(target=traffic, args=(base, stop), daemon=True)
        sender.start()
        time.sleep(20)  # let the charts draw a stretch of history
        page.screenshot(path=HERE / "chat-desktop.png")
        dash.screenshot(path=HERE / "dashboard-desktop.png", full_page=True)  # the tables too
        phone = browser.new_context(viewport=PHONE, base_url=base, is_mobile=True, has_touch=True,
                                    storage_state=desk.storage_state())
        ppage = phone.new_page()
        ppage.goto("/")
        ppage.wait_for_selector("#messages li.msg.assistant")
        ppage.screenshot(path=HERE / "chat-phone.png")
        pdash = phone.new_page()
        pdash.goto("/dashboard")
        time.sleep(12)
        pdash.screenshot(path=HERE / "dashboard-phone.png", full_page=False)
        stop.set()
        sender.join(timeout=130)
        browser.close()


if __name__ == "__main__":
    main()
