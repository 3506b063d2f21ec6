"""Prefix reuse gives the same greedy outputs as recomputing, with the default model.

Requests share a long system prompt; the first round runs them all at once (sharing
blocks while running), the second round finds them in the cache.
"""
import pytest

from tuili import LLM, SamplingParams

SYSTEM = ("You are a careful assistant for a public library. " * 12).strip()
QUESTIONS = ["How do I renew a book?", "What are the opening hours?", "Can I print documents?",
             "Do you lend e-books?", "How many books can I borrow?", "Is there a reading room?"]
GREEDY = SamplingParams(temperature=0, max_tokens=16)


@pytest.fixture(scope="module")
def uncached():
    """An engine with prefix caching off: its outputs are the recomputed reference."""
    return LLM("smollm2-135m-instruct", dtype="float32", kv_cache_memory="64MiB", enable_prefix_caching=False)


@pytest.fixture(scope="module")
def prompts(default_model_folder, uncached):
    ids = [uncached.chat_prompt_ids([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
           for q in QUESTIONS]
    return ids, [o.outputs[0].token_ids for o in uncached.generate(ids, GREEDY)]


def computed_tokens(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by the tokens each engine step computes (prefill chunks and decodes)."""
    engine, counted = llm.engine, []
    step = engine.step

    def counting_step():
        deltas = step()
        counted.append(engine.last_step_tokens)
        return deltas

    monkeypatch.setattr(engine, "step", counting_step)
    return counted


def test_disabled_prefix_caching_recomputes_every_prompt(prompts, uncached, monkeypatch):
    """The same requests again on the uncached engine: every prompt token is computed again
    (a cache would skip all but each prompt's tail), nothing counts as cached, same outputs."""
    ids, expected = prompts
    counted = computed_tokens(uncached, monkeypatch)
    again = uncached.generate(ids, GREEDY)
    assert [o.outputs[0].token_ids for o in again] == expected
    new = sum(len(o.outputs[0].token_ids) for o in again)
    assert sum(counted) == sum(map(len, ids)) + new - len(ids)  # each last sampled token is never fed back
    assert all(o.num_cached_tokens == 0 for o in again)
    assert uncached.engine.stats()["prefix_hit_tokens"] == 0 and uncached.engine.blocks.cached == {}


def test_shared_prefix_outputs_equal_recompute(prompts, monkeypatch):
    ids, expected = prompts
    llm = LLM("smollm2-135m-instruct", dtype="float32", kv_cache_memory="64MiB", max_num_batched_tokens=256)
    first = llm.generate(ids, GREEDY)  # concurrent: later requests reuse blocks of the earlier ones
    assert [o.outputs[0].token_ids for o in first] == expected
    hits_first = llm.engine.blocks.prefix_hit_tokens
    assert hits_first > 0 and any(o.num_cached_tokens > 0 for o in first)
    counted = computed_tokens(llm, monkeypatch)
    second = llm.generate(ids, GREEDY)  # everything but each prompt's tail is now cached
    assert [o.outputs[0].token_ids for o in second] == expected
    shared = min(len(p) for p in ids) // 16 * 16 - 16
    assert all(o.num_cached_tokens >= shared for o in second)
    cached, new = (sum(o.num_cached_tokens for o in second), sum(len(o.outputs[0].token_ids) for o in second))
    assert sum(counted) == sum(map(len, ids)) - cached + new - len(ids)  # the cached tokens were not computed
    assert llm.engine.blocks.num_used_blocks == 0




def test_disk_tier_gives_the_same_outputs_after_restart(prompts, tmp_path):
    """The first engine saves its blocks to disk on close; a new engine restores them for
    three requests that run at once and share the system prompt. (Pushing blocks through
    host memory to disk and the per-tier counters are covered by test_kv_tiers_engine.py
    on a small random model, where it is fast.)"""
    ids, expected = prompts
    options = dict(dtype="float32", kv_cache_memory="64MiB", kv_disk_dir=str(tmp_path))
    first = LLM("smollm2-135m-instruct", **options)
    assert first.generate([ids[0]], GREEDY)[0].outputs[0].token_ids == expected[0]
    first.close()
    again = LLM("smollm2-135m-instruct", max_num_batched_tokens=256, **options)
    outs = again.generate(ids[:3], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected[:3]
    s = again.engine.stats()
    assert s["prefix_hit_tokens_disk"] >= (len(ids[0]) - 1) // 16 * 16
    assert s["kv_blocks_moved_disk_to_device"] > 0 and s["kv_disk_errors"] == 0
    again.close()
