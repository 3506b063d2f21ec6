"""Start `tuili serve` as a subprocess on a free loopback port and wait until it answers
(tuili.bench.launch does the starting, waiting and stopping for tests and benchmarks alike)."""
from __future__ import annotations

import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

from fastapi import FastAPI, Request

from tuili.bench.launch import free_port, launch, tuili_serve_cmd


@contextmanager
def running_server(*extra: str, timeout: float = 240.0):
    """Yields (base_url, log_path) of a healthy `tuili serve ... *extra`; stops it (SIGINT) on exit."""
    port = free_port()
    with tempfile.NamedTemporaryFile("w", prefix="tuili-serve-", suffix=".log", delete=False) as log:
        log_path = Path(log.name)
    server = launch(tuili_serve_cmd(port, *extra), port, log_path, timeout_s=timeout, need_model=False,
                    tail_lines=60)
    try:
        yield server.base_url, str(log_path)
    finally:
        server.stop(grace_s=20.0, sig=signal.SIGINT)


@contextmanager
def app_in_thread(app):
    """Serve an ASGI app (a fake server for client tests) on a free loopback port in a thread; yields its URL."""
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("fake server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()


def fake_openai_app(handle, model_ids=("fake",)):
    """A FastAPI app with GET /v1/models listing `model_ids` and the two generation routes
    calling `await handle(request, chat)`; a test adds what else its fake server needs."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": i, "object": "model"} for i in model_ids]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return app
