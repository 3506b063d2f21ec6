"""KV tiers in a running engine (small random-weight Llama from conftest's `tiny_model`): blocks pushed from the device
pool to host memory and disk come back with identical greedy output; the disk tier
survives a restart, is never shared with another dtype, quantization or block size, shrugs
off corrupt and truncated files, and keeps its size bound."""
import logging

import pytest

from tuili import LLM, SamplingParams
from tuili.engine.sequence import Sequence

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
BLOCK = 4
BLOCK_NBYTES = 3 * 2 * BLOCK * 2 * 16 * 4  # layers * (k, v) * tokens * kv heads * head dim * fp32


@pytest.fixture(scope="module")
def model(tiny_model):
    folder = tiny_model("llama")  # 3 layers, 2 KV heads of 16
    prompts = dict(zip("ABCD", tiny_model.prompts(folder, [33] * 4, seed=3)))
    ref = LLM(str(folder), dtype="float32", block_size=BLOCK, enable_prefix_caching=False)
    expected = {k: ref.generate([p], GREEDY)[0].outputs[0].token_ids for k, p in prompts.items()}
    return str(folder), prompts, expected


def tiered(folder, **options) -> LLM:
    # 12 blocks of 4 tokens: one 33-token prompt plus its 8 new tokens takes 11 of them.
    return LLM(folder, **{"dtype": "float32", "block_size": BLOCK, "num_kv_blocks": 12, **options})


def gen(llm: LLM, prompt: list[int]) -> list[int]:
    return llm.generate([prompt], GREEDY)[0].outputs[0].token_ids


def hits(llm: LLM) -> dict[str, int]:
    s = llm.engine.stats()
    return {t: s[f"prefix_hit_tokens_{t}"] for t in ("device", "host", "disk")}


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


def test_blocks_come_back_from_host_memory(model):
    folder, prompts, expected = model
    llm = tiered(folder, kv_host_memory=64 * BLOCK_NBYTES)
    assert gen(llm, prompts["A"]) == expected["A"]
    assert gen(llm, prompts["B"]) == expected["B"]  # pushes most of A's blocks out of the pool
    s = llm.engine.stats()
    assert s["kv_blocks_moved_device_to_host"] > 0 and s["kv_host_blocks"] > 0
    before = hits(llm)
    assert gen(llm, prompts["A"]) == expected["A"]
    got = delta(hits(llm), before)
    assert got["device"] + got["host"] == 32 and got["host"] >= 24 and got["disk"] == 0
    assert llm.engine.stats()["kv_blocks_moved_host_to_device"] == got["host"] // BLOCK


def test_blocks_go_down_to_disk_and_come_back(model, tmp_path):
    folder, prompts, expected = model
    # A step budget of 20 tokens: a second prompt is admitted beside the first one's prefill,
    # so several prompts at once run out of blocks and preempt (below).
    llm = tiered(folder, kv_host_memory=2 * BLOCK_NBYTES, kv_disk_dir=str(tmp_path), kv_disk_size="1MiB",
                 max_num_batched_tokens=20)
    assert gen(llm, prompts["A"]) == expected["A"]
    assert gen(llm, prompts["B"]) == expected["B"]
    s = llm.engine.stats()
    assert s["kv_evictions_host"] > 0 and s["kv_blocks_moved_host_to_disk"] > 0 and s["kv_disk_blocks"] > 0
    before = hits(llm)
    assert gen(llm, prompts["A"]) == expected["A"]
    got = delta(hits(llm), before)
    # B took 10 of the 12 blocks, evicting A's last blocks first: A's first two blocks are
    # still on the device, the two evicted last (A's 3rd and 4th) in host memory, the rest on disk.
    assert got == {"device": 8, "host": 8, "disk": 16}
    # Several prompts at once on a pool that cannot hold them: preemption plus tier traffic.
    before = llm.engine.stats()
    outs = llm.generate([prompts[k] for k in "ABCD"], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == [expected[k] for k in "ABCD"]
    after = llm.engine.stats()
    assert after["preemptions"] > before["preemptions"]
    assert after["prefix_hit_tokens_host"] + after["prefix_hit_tokens_disk"] > \
        before["prefix_hit_tokens_host"] + before["prefix_hit_tokens_disk"]
    llm.close()


def test_restart_finds_the_disk_tier_and_other_settings_ignore_it(model, tmp_path):
    folder, prompts, expected = model
    first = tiered(folder, kv_disk_dir=str(tmp_path))
    for k in "AB":
        assert gen(first, prompts[k]) == expected[k]
    first.close()  # saves what the pool holds
    again = tiered(folder, kv_disk_dir=str(tmp_path))
    assert again.engine.stats()["kv_disk_blocks"] > 0
    assert gen(again, prompts["A"]) == expected["A"]
    assert hits(again) == {"device": 0, "host": 0, "disk": 32}
    again.close()
    other = LLM(folder, dtype="float32", block_size=8, num_kv_blocks=6, kv_disk_dir=str(tmp_path))
    assert other.engine.stats()["kv_disk_blocks"] == 0
    assert gen(other, prompts["A"]) == expected["A"]
    assert hits(other)["disk"] == 0
    other.close()


@pytest.mark.parametrize("setting", [{"dtype": "bfloat16"}, {"quantization": "int8"}, {"kv_cache_dtype": "int8"}],
                         ids=["dtype", "quantization", "kv-dtype"])
def test_disk_tier_of_another_dtype_or_quantization_is_never_used(model, tmp_path, setting):
    """A restart that changes only the dtype, the weights' quantization or the KV dtype gets
    a directory of its own and no disk hits; the first setting's blocks stay there for it.
    (int8 weights leave the KV layout as it was: only the fingerprint tells them apart.)"""
    folder, prompts, expected = model
    first = tiered(folder, kv_disk_dir=str(tmp_path))
    assert gen(first, prompts["A"]) == expected["A"]
    first.close()
    (first_dir,) = tmp_path.glob("tuili-kv-*")
    other = tiered(folder, kv_disk_dir=str(tmp_path), **setting)
    assert other.engine.stats()["kv_disk_blocks"] == 0
    gen(other, prompts["A"])
    assert hits(other) == {"device": 0, "host": 0, "disk": 0}
    other.close()
    assert len(set(tmp_path.glob("tuili-kv-*")) - {first_dir}) == 1
    again = tiered(folder, kv_disk_dir=str(tmp_path))
    assert gen(again, prompts["A"]) == expected["A"]
    assert hits(again) == {"device": 0, "host": 0, "disk": 32}
    again.close()


def test_corrupt_and_truncated_files_are_detected_and_recomputed(model, tmp_path, caplog):
    folder, prompts, expected = model
    first = tiered(folder, kv_disk_dir=str(tmp_path))
    assert gen(first, prompts["A"]) == expected["A"]
    first.close()
    disk_dir = next(tmp_path.glob("tuili-kv-*"))
    seq = Sequence("x", 0, prompts["A"], GREEDY)
    first.engine.blocks._extend_hashes(seq, 32)
    path = {i: disk_dir / h.hex()[:2] / f"{h.hex()}.kvb" for i, h in enumerate(seq.block_hashes)}
    data = bytearray(path[2].read_bytes())
    data[-5] ^= 0x40  # one flipped bit in the payload of the third block
    path[2].write_bytes(bytes(data))
    path[5].write_bytes(path[5].read_bytes()[:-100])  # the sixth block loses its end
    with caplog.at_level(logging.WARNING, logger="tuili.kv"):
        again = tiered(folder, kv_disk_dir=str(tmp_path))
        assert gen(again, prompts["A"]) == expected["A"]
    assert hits(again) == {"device": 0, "host": 0, "disk": 8}  # blocks 0 and 1; the rest recomputed
    assert "checksum mismatch" in caplog.text and "truncated" in caplog.text
    assert again.engine.stats()["kv_disk_errors"] == 2
    assert not path[2].exists()
    assert gen(again, prompts["A"]) == expected["A"]
    again.close()


def test_disk_tier_size_bound_holds(model, tiny_model, tmp_path):
    folder, prompts, expected = model
    bound = 10 * (BLOCK_NBYTES + 64) + 50
    llm = tiered(folder, kv_disk_dir=str(tmp_path), kv_disk_size=bound)
    for prompt in tiny_model.prompts(folder, [33] * 6, seed=9):
        llm.generate([prompt], GREEDY)
        assert llm.engine.stats()["kv_disk_bytes"] <= bound
    llm.close()
    on_disk = sum(p.stat().st_size for p in tmp_path.rglob("*.kvb"))
    assert 0 < on_disk <= bound
    again = tiered(folder, kv_disk_dir=str(tmp_path), kv_disk_size=bound)
    s = again.engine.stats()
    assert s["kv_disk_blocks"] == 10 and s["kv_disk_bytes"] <= bound
    again.close()


def test_int8_kv_blocks_round_trip_through_host_and_disk(model, tmp_path):
    """An int8 cache moves its codes and its scales together: output equals an untiered int8 run."""
    folder, prompts, _ = model
    ref = LLM(folder, dtype="float32", block_size=BLOCK, enable_prefix_caching=False, kv_cache_dtype="int8")
    want = {k: gen(ref, prompts[k]) for k in "AB"}
    int8_block = 3 * 2 * BLOCK * 2 * (16 + 4)  # layers * (k, v) * tokens * kv heads * (codes + a float32 scale)
    llm = tiered(folder, kv_cache_dtype="int8", kv_host_memory=2 * int8_block, kv_disk_dir=str(tmp_path),
                 kv_disk_size="1MiB")
    assert llm.engine.runner.block_nbytes == int8_block
    assert gen(llm, prompts["A"]) == want["A"]
    assert gen(llm, prompts["B"]) == want["B"]
    before = hits(llm)
    assert gen(llm, prompts["A"]) == want["A"]
    got = delta(hits(llm), before)
    assert got["host"] > 0 and got["disk"] > 0
    llm.close()
