"""Greedy parity with transformers on small random-weight models, one per architecture
variant (conftest's TINY_VARIANTS; Gemma 3's own checks are in test_gemma3.py).

Each model is saved with `save_pretrained` and loaded back through tuili's own loader, so
the HF-folder path is covered too. Small block size and token budget force chunked prefill
and multi-block tables; a tiny pool forces preemption.
"""
import pytest

from tuili import LLM, SamplingParams

LENGTHS = [3, 17, 9, 40, 1, 26]
NEW = 12


@pytest.fixture(scope="module")
def saved(tiny_variant, tiny_model):
    folder = tiny_variant
    prompts = tiny_model.prompts(folder, LENGTHS)
    return folder, prompts, tiny_model.greedy(folder, prompts, NEW)


@pytest.fixture
def llama(tiny_model):
    return str(tiny_model("llama"))


GREEDY = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)


def generate_ids(llm, prompts):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]


def test_batched_greedy_matches_transformers(saved):
    folder, prompts, refs = saved
    llm = LLM(str(folder), dtype="float32", block_size=4, max_num_batched_tokens=32, num_kv_blocks=128)
    assert generate_ids(llm, prompts) == refs


def test_one_at_a_time_matches_transformers(saved):
    folder, prompts, refs = saved
    llm = LLM(str(folder), dtype="float32", block_size=8, enable_prefix_caching=False)
    assert [generate_ids(llm, [p])[0] for p in prompts] == refs


def test_preemption_keeps_outputs(saved):
    folder, prompts, refs = saved
    # 14 blocks of 4 tokens: the longest request alone needs 13; together they need far more.
    llm = LLM(str(folder), dtype="float32", block_size=4, num_kv_blocks=14, max_num_batched_tokens=64)
    assert generate_ids(llm, prompts) == refs
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.blocks.num_used_blocks == 0


def test_abort_running_request_frees_blocks(llama):
    llm = LLM(llama, dtype="float32", block_size=4, num_kv_blocks=64)
    engine = llm.engine
    engine.add_request("a", list(range(3, 30)), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", list(range(40, 50)), SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    used_both = engine.blocks.num_used_blocks
    engine.abort_request("a")
    assert engine.blocks.num_used_blocks < used_both
    assert [s.request_id for s in engine.scheduler.running] == ["b"]
    engine.abort_request("b")
    assert engine.blocks.num_used_blocks == 0 and not engine.has_unfinished_requests()
    assert engine.step() == []


def test_engine_rejects_requests_that_cannot_fit(llama, tiny_model):
    cfg = tiny_model.config(llama)
    llm = LLM(llama, dtype="float32", block_size=4, num_kv_blocks=8)
    with pytest.raises(ValueError, match="max_tokens"):
        llm.generate([[5] * 10], SamplingParams(max_tokens=cfg["max_position_embeddings"]))
    with pytest.raises(ValueError, match="KV blocks"):
        llm.generate([[5] * 30], SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([[cfg["vocab_size"]]], SamplingParams(max_tokens=1))
    # a request that fits runs to max_tokens (EOS ignored: sampled at temperature 1 from random
    # weights it came up within 4 tokens in one full run, whatever the RNG state left by earlier tests)
    out = llm.generate([[5] * 10], SamplingParams(max_tokens=4, ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4


def test_no_max_tokens_stops_at_the_pool_size(llama):
    llm = LLM(llama, dtype="float32", block_size=4, num_kv_blocks=10)  # 40 tokens < 256 context
    outs = llm.generate([[5] * 10, [7] * 6], SamplingParams(max_tokens=None, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in outs] == [30, 34]
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert llm.engine.blocks.num_used_blocks == 0
