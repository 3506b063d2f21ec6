"""A bounded fuzz run of the server's OpenAPI document with schemathesis.

The server runs with a short context (so generated requests stay cheap on 2 cores) and an
API key. schemathesis generates valid and invalid bodies, paths and headers for every
operation and checks: no 5xx, every status documented, every documented body (errors in
OpenAI's form included) matching its schema. The run is bounded by --max-time.
"""
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from server_util import running_server

FUZZ_SECONDS = 60


def test_the_openapi_document_lists_every_error_and_the_request_bodies(default_model_folder):
    with running_server("--dtype", "float32", "--kv-cache-memory", "64MiB", "--max-model-len", "128") as (base, _):
        doc = httpx.get(base + "/openapi.json").json()
        assert doc["openapi"].startswith("3.1")
        for path in ("/v1/completions", "/v1/chat/completions"):
            op = doc["paths"][path]["post"]
            assert {"400", "401", "404", "413", "429", "503"} <= set(op["responses"]), path
            assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].startswith("#/components/")
        assert "Error" in doc["components"]["schemas"]


def test_schemathesis_finds_no_server_error_and_no_undocumented_response(default_model_folder, tmp_path):
    st = shutil.which("schemathesis") or str(Path(sys.executable).with_name("schemathesis"))
    if not Path(st).exists():
        pytest.fail("schemathesis is not installed: `pip install -e '.[dev]'` installs it")
    # A short context keeps every generated request short: a body without max_tokens runs to it.
    with running_server("--dtype", "float32", "--kv-cache-memory", "64MiB", "--max-model-len", "64",
                        "--max-num-seqs", "8", "--api-key", "fuzz-key") as (base, log):
        cmd = [st, "run", base + "/openapi.json", "--max-time", str(FUZZ_SECONDS), "--workers", "1",
               "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                           "response_schema_conformance",
               "--header", "Authorization: Bearer fuzz-key", "--request-timeout", "120",
               "--suppress-health-check", "all", "--phases", "examples,coverage,fuzzing", "--seed", "1"]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=FUZZ_SECONDS * 4)
        report = run.stdout[-6000:] + run.stderr[-2000:]
        assert run.returncode == 0, report
        assert "No issues found" in run.stdout or " 0 failures" in run.stdout or "passed" in run.stdout, report
        healthy = httpx.get(base + "/health")
        assert healthy.status_code == 200  # and the server still serves
