"""Random-weight model folders for the GPU check: Llama shapes saved as HF folders.

The GPU machine cannot download weights, and the default model's GGUF (98 MB) is larger
than what travels in one call, so the benchmarks run on random weights of realistic
shapes: SmolLM2-135M's (30 layers, hidden 576, GQA 9/3, vocab 49152, tied) and
Llama-3.2-1B's (16 layers, hidden 2048, GQA 32/8, vocab 128256, tied, llama3 rope).
Speed does not depend on the values; correctness is checked elsewhere (the pytest
parity tests build their own small random models and compare with transformers).

A folder may carry a byte-level tokenizer built here (256 byte tokens plus ChatML
specials), so that the server can be driven with text through the OpenAI client.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES: dict[str, dict] = {
    # SmolLM2-135M-Instruct's config
    "135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                 rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5),
    # Llama-3.2-1B's config
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
               rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5, head_dim=64,
               rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # CPU smoke runs (--tiny): same code paths, seconds on two cores
    "tiny": dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                 rope_theta=10000.0, tie_word_embeddings=True, rms_norm_eps=1e-5),
    "tiny2": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  rope_theta=10000.0, tie_word_embeddings=True, rms_norm_eps=1e-5),
}

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def param_count(shape: str) -> int:
    s = SHAPES[shape]
    h, i, n = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    d = s.get("head_dim") or h // s["num_attention_heads"]
    attn = h * d * (s["num_attention_heads"] * 2 + s["num_key_value_heads"] * 2)
    layer = attn + 3 * h * i + 2 * h
    head = 0 if s["tie_word_embeddings"] else s["vocab_size"] * h
    return n * layer + s["vocab_size"] * h + head + h


def random_weights(shape: str, device: str, seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """HF Llama-named bf16 tensors, drawn on `device` (fast on a GPU), returned on the CPU."""
    s = SHAPES[shape]
    h, i = s["hidden_size"], s["intermediate_size"]
    d = s.get("head_dim") or h // s["num_attention_heads"]
    q, kv = s["num_attention_heads"] * d, s["num_key_value_heads"] * d
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=g, device=device, dtype=torch.float32) * std).to(torch.bfloat16).cpu()

    w = {"model.embed_tokens.weight": rnd(s["vocab_size"], h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    if not s["tie_word_embeddings"]:
        w["lm_head.weight"] = rnd(s["vocab_size"], h)
    for n in range(s["num_hidden_layers"]):
        p = f"model.layers.{n}."
        w.update({p + "self_attn.q_proj.weight": rnd(q, h), p + "self_attn.k_proj.weight": rnd(kv, h),
                  p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, q),
                  p + "mlp.gate_proj.weight": rnd(i, h), p + "mlp.up_proj.weight": rnd(i, h),
                  p + "mlp.down_proj.weight": rnd(h, i),
                  p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                  p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)})
    return w


def hf_config(shape: str) -> dict:
    s = dict(SHAPES[shape])
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16", "bos_token_id": 1,
            "eos_token_id": 2, "pad_token_id": 0, **s}


def make_folder(shape: str, root: Path, device: str = "cpu", seed: int = 0, tokenizer: bool = False) -> Path:
    """Write config.json + model.safetensors (random bf16) under root/<shape>; reuse an existing one."""
    folder = Path(root) / f"random-{shape}-s{seed}"
    if (folder / "model.safetensors").is_file() and (not tokenizer or (folder / "tokenizer.json").is_file()):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config(shape), indent=1))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    if tokenizer:
        save_byte_tokenizer(folder)
    save_file(random_weights(shape, device, seed), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def save_byte_tokenizer(folder: Path) -> None:
    """A byte-level BPE with no merges: ids 0..2 are <|endoftext|>, <|im_start|>, <|im_end|>,
    then one token per byte. Enough for the server's text paths and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: n for n, t in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(str(folder))
