"""The chat page and the dashboard against `tuili serve --replicas 2` (two models behind the `auto`
router, each on two Ray Serve replicas): the browser tests of test_web_e2e.py, collected again here."""
import pytest

import test_web_e2e as web
from server_util import running_server
from test_web_e2e import *  # noqa: F401,F403 - the same browser tests


@pytest.fixture(scope="module")
def server(default_model_folder):
    web.require_browser()
    with running_server("--dtype", "float32", "--max-model-len", "1024",
                        "--model", f"small={web.DEFAULT},kv_cache_memory=48MiB",
                        "--model", f"big={web.DEFAULT},kv_cache_memory=48MiB",
                        "--router", "fast=small,strong=big", "--replicas", "2", "--cpus-per-replica", "0.5") as (b, _):
        yield b
