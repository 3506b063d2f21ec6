"""Gemma 3 on a small random-weight model (conftest's TINY_VARIANTS["gemma3-window"]): its
config fields, the PyTorch decode path, that the window really matters, and a GGUF file.
Batched, chunked, one-at-a-time and preempted greedy parity with transformers run in
test_engine_random.py, with the other architectures.

Window 8 with prompts up to 45 tokens and 12 new tokens: the sliding window cuts into the
context in prefill and in every decode step. Norm weights are randomised (transformers
initialises them to 0, which would hide a wrong `1 + weight`), the query scale differs
from head_dim**-0.5, local and global layers use different rope bases (global with linear
scaling), and final logits are softcapped.
"""
import pytest
import torch

from tuili import LLM, SamplingParams
from tuili.config import ModelConfig

VOCAB = 320
LENGTHS = [3, 45, 9, 17, 1, 30]
NEW = 12


@pytest.fixture(scope="module")
def saved(tiny_model):
    folder = tiny_model.variant("gemma3-window")  # conftest's TINY_VARIANTS
    prompts = tiny_model.prompts(folder, LENGTHS)
    return folder, prompts, tiny_model.greedy(folder, prompts, NEW)


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


GGUF_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "input_layernorm": "attn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
              "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
              "post_feedforward_layernorm": "post_ffw_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def test_tiny_gemma3_gguf_converts_and_generates_like_transformers(tiny_model, tmp_path, monkeypatch):
    """A random Gemma 3 written as llama.cpp writes it (norm weights stored as 1 + w, its own
    tensor names, no local rope base or query scale in the metadata) loads back to the same
    weights and greedy ids as the HF model with transformers' defaults for what GGUF omits."""
    import gguf
    import numpy as np

    from tuili.model.kernels import cpu_kernels
    from tuili.model.loader import load_model

    cpu_kernels()  # loaded from the shared cache before it is redirected
    monkeypatch.setenv("TUILI_CACHE", str(tmp_path / "cache"))  # the conversion goes here
    folder = tiny_model("gemma3", seed=5, random_norms=True, vocab_size=VOCAB, num_hidden_layers=6, head_dim=32,
                        query_pre_attn_scalar=32, sliding_window=8, rms_norm_eps=1e-6, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2,
                        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    model = tiny_model.hf(folder)
    writer = gguf.GGUFWriter(str(tmp_path / "tiny-gemma.gguf"), "gemma3")
    for add, value in ((writer.add_block_count, 6), (writer.add_context_length, 256),
                       (writer.add_embedding_length, 64), (writer.add_feed_forward_length, 112),
                       (writer.add_head_count, 4), (writer.add_head_count_kv, 2), (writer.add_key_length, 32),
                       (writer.add_value_length, 32), (writer.add_layer_norm_rms_eps, 1e-6),
                       (writer.add_rope_freq_base, 1e6), (writer.add_sliding_window, 8)):
        add(value)
    expected = {}
    for name, p in model.named_parameters():  # the tied lm_head is not listed
        stem = name.removesuffix(".weight")
        if stem.startswith("model.layers."):
            _, _, layer, module = stem.split(".", 3)
            gname = f"blk.{layer}.{GGUF_NAMES[module]}.weight"
        else:
            gname = GGUF_NAMES[stem] + ".weight"
        w = p.detach().numpy()
        stored = w + np.float32(1.0) if "norm" in name else w
        writer.add_tensor(gname, np.ascontiguousarray(stored, dtype=np.float32))
        expected[name] = p.detach().clone()
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    loaded = load_model(str(tmp_path / "tiny-gemma.gguf"))
    assert loaded.config.architecture == "gemma3_text" and loaded.config.sliding_window == 8
    assert loaded.config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    assert sorted(loaded.weights) == sorted(expected)
    for name, w in expected.items():
        torch.testing.assert_close(loaded.weights[name], w, rtol=0, atol=1e-6)
    prompts = tiny_model.prompts(folder, [4, 20], seed=3)
    refs = tiny_model.greedy(folder, prompts, NEW)
    llm = LLM(str(tmp_path / "tiny-gemma.gguf"), dtype="float32", block_size=4, num_kv_blocks=64)
    assert generate_ids(llm, prompts) == refs


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
