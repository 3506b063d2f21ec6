"""Gemma 3 greedy parity with transformers on a small random-weight model built here.

Window 8 with prompts up to 45 tokens and 12 new tokens: the sliding window cuts into the
context in prefill (whole and chunked) and in every decode step. Norm weights are
randomised (transformers initialises them to 0, which would hide a wrong `1 + weight`),
the query scale differs from head_dim**-0.5, local and global layers use different rope
bases (global with linear scaling), and final logits are softcapped.
"""
import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from tuili import LLM, SamplingParams
from tuili.config import ModelConfig

VOCAB = 320
LENGTHS = [3, 45, 9, 17, 1, 30]
NEW = 12


def gemma_config() -> Gemma3TextConfig:
    return Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24, max_position_embeddings=256,
        sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}},
        final_logit_softcapping=30.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(1234)
    model = Gemma3ForCausalLM(gemma_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5)
            elif p.dim() == 2:
                p.mul_(4.0)
    folder = tmp_path_factory.mktemp("gemma3")
    model.save_pretrained(folder)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]
    with torch.no_grad():
        refs = [model.generate(torch.tensor([p]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                               pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    return folder, prompts, refs


GREEDY = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)


def generate_ids(llm, prompts):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]


def test_config_reads_gemma3_fields(saved):
    import json

    cfg = ModelConfig.from_hf_config(json.loads((saved[0] / "config.json").read_text()))
    assert cfg.architecture == "gemma3_text" and cfg.sliding_window == 8
    assert cfg.layer_types[1] == "full_attention" and cfg.rope_local_theta == 1000.0 and cfg.rope_theta == 50000.0
    assert cfg.rope_scaling["rope_type"] == "linear" and cfg.query_pre_attn_scalar == 24
    assert cfg.tie_word_embeddings and cfg.final_logit_softcapping == 30.0


def test_batched_chunked_greedy_matches_transformers(saved):
    folder, prompts, refs = saved
    llm = LLM(str(folder), dtype="float32", block_size=4, max_num_batched_tokens=16, num_kv_blocks=128)
    assert generate_ids(llm, prompts) == refs


def test_one_at_a_time_matches_transformers(saved):
    folder, prompts, refs = saved
    llm = LLM(str(folder), dtype="float32", block_size=8, enable_prefix_caching=False)
    assert [generate_ids(llm, [p])[0] for p in prompts] == refs


def test_torch_decode_path_matches_too(saved, monkeypatch):
    """The PyTorch decode fallback (used off CPU or without the compiled kernel) honours the window."""
    import tuili.model.layers as layers

    monkeypatch.setattr(layers, "cpu_kernels", lambda: None)
    folder, prompts, refs = saved
    llm = LLM(str(folder), dtype="float32", block_size=4, num_kv_blocks=128)
    assert generate_ids(llm, prompts[:2]) == refs[:2]


def test_window_matters(saved):
    """Guard against a vacuous test: without the window, outputs of the long prompt differ."""
    folder, prompts, refs = saved
    llm = LLM(str(folder), dtype="float32", block_size=8)
    for layer in llm.engine.model.layers:
        layer.window = None
    assert generate_ids(llm, [prompts[1]])[0] != refs[1]


@pytest.mark.slow
def test_gemma3_270m_gguf_matches_transformers_gguf_load():
    """The real Gemma 3 270M (optional package, Gemma terms) against transformers' own load of
    the same GGUF file: same greedy ids in float32, with a prompt longer than nothing special."""
    from transformers import AutoModelForCausalLM

    from tuili.model.loader import known_model_gguf

    try:
        gguf_path = known_model_gguf("gemma3-270m")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    llm = LLM("gemma3-270m", dtype="float32", kv_cache_memory="256MiB", max_model_len=1024)
    tok = llm.engine.tokenizer
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    ids = [tok(p).input_ids for p in prompts]
    ours = generate_ids(llm, ids)
    hf = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                              dtype=torch.float32).eval()
    with torch.no_grad():
        refs = [hf.generate(torch.tensor([p]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                            pad_token_id=0)[0, len(p):].tolist() for p in ids]
    assert ours == refs
