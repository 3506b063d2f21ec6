"""The disk KV tier shared by several engines on one machine (`TUILI_KV_DISK_SHARED=1`, as
the replicas of `tuili serve --replicas` run): a prefix computed and saved by engine A is a
disk hit for engine B, and two writers of one directory never leave a torn file."""
import os
import subprocess
import sys

import pytest
import torch

from tuili import LLM, SamplingParams
from tuili.engine.disk_tier import HEADER, DiskTier

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
FP = b"f" * 16
NB = 256


@pytest.fixture
def shared(monkeypatch):
    monkeypatch.setenv("TUILI_KV_DISK_SHARED", "1")


def h(i: int) -> bytes:
    return i.to_bytes(16, "little")


def test_block_written_by_one_process_is_a_hit_for_another(tmp_path, shared):
    b = DiskTier(tmp_path, 1 << 20, FP, NB)  # B starts first and scans an empty directory
    code = ("import torch; from tuili.engine.disk_tier import DiskTier\n"
            f"a = DiskTier({str(tmp_path)!r}, 1 << 20, {FP!r}, {NB})\n"
            "assert a.enabled\n"
            f"a.put((7).to_bytes(16, 'little'), torch.arange({NB}, dtype=torch.int32).to(torch.uint8)); a.close()\n")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ), timeout=120)
    assert b.enabled and h(7) in b
    got = b.get_many([h(7)])[0]
    assert torch.equal(got, torch.arange(NB, dtype=torch.int32).to(torch.uint8))
    assert h(8) not in b
    b.close()


def test_two_writers_of_the_same_block_leave_one_whole_file(tmp_path, shared):
    a = DiskTier(tmp_path, 1 << 20, FP, NB)
    b = DiskTier(tmp_path, 1 << 20, FP, NB)
    assert a.enabled and b.enabled
    payload = torch.full((NB,), 5, dtype=torch.uint8)
    for _ in range(20):
        a.put(h(1), payload)
        b.put(h(1), payload)
    a.drain()
    b.drain()
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "lock"]
    assert len(files) == 1 and files[0].stat().st_size == HEADER.size + NB
    assert torch.equal(DiskTier(tmp_path, 1 << 20, FP, NB).get_many([h(1)])[0], payload)
    a.close()
    b.close()


def test_without_shared_mode_a_second_writer_stays_off(tmp_path, monkeypatch):
    monkeypatch.delenv("TUILI_KV_DISK_SHARED", raising=False)
    a = DiskTier(tmp_path, 1 << 20, FP, NB)
    b = DiskTier(tmp_path, 1 << 20, FP, NB)
    assert a.enabled and not b.enabled
    a.close()


def test_prefix_computed_on_engine_a_is_a_disk_hit_on_engine_b(tiny_model, tmp_path, shared):
    folder = str(tiny_model("llama"))
    prompt = tiny_model.prompts(tiny_model("llama"), [33], seed=5)[0]
    opts = dict(dtype="float32", block_size=4, num_kv_blocks=24, kv_disk_dir=str(tmp_path))
    a, b = LLM(folder, **opts), LLM(folder, **opts)  # both running on one directory, as two replicas
    want = a.generate([prompt], GREEDY)[0].outputs[0].token_ids
    a.engine.close()  # A saves what it computed
    got = b.generate([prompt], GREEDY)[0].outputs[0].token_ids
    s = b.engine.stats()
    assert s["prefix_hit_tokens_disk"] >= 32 and got == want
