"""GGUF -> Hugging Face: the config.json dict, the tensors under HF names, and the tokenizer.

Decisions:

- GGUF tensors are dequantized to float32 with `gguf.quants` (numpy): the engine runs
  dense float weights, so a 4-bit file grows about 5x on disk (SmolLM2: 98 MB -> 540 MB).
- llama.cpp permutes the rows of the Q and K projections of Llama/Mistral models for
  its rope layout; they are permuted back to HF order. Qwen2/Qwen3 are stored unpermuted.
  The result equals what `transformers` loads from the same GGUF file, bit for bit.
- Tied embeddings: when the file has no `output.weight`, no `lm_head.weight` is written
  (as in HF checkpoints) and config.json says `tie_word_embeddings: true`.
- Rope scaling comes from the `{arch}.rope.scaling.*` metadata when present. Llama 3's
  scaling is stored by llama.cpp only as a precomputed `rope_freqs` tensor, which cannot
  be mapped back to HF's parameters without the original context length: it is skipped
  with a warning (such a model runs with plain rope).
- The tokenizer is built by `transformers` from the GGUF metadata and saved
  (tokenizer.json, tokenizer_config.json, chat template); the saved copy is checked to
  encode a few probe strings to the same ids before the folder is published.
- Gemma 3 (GGUF architecture "gemma3") becomes HF `gemma3_text`: llama.cpp stores its
  RMSNorm weights as 1 + w, so 1 is subtracted from every norm weight (as transformers'
  GGUF loader does); its `ffn_norm` is the pre-feedforward norm; metadata that GGUF does
  not carry (local rope base, query scale, layer pattern) takes transformers' defaults.

`gguf` and `transformers` are imported lazily, only when a file is converted.
"""
from __future__ import annotations

import functools
import logging
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    import gguf

log = logging.getLogger("tuili.model.loader")


# GGUF architecture (after the Mistral rename below) -> HF class and whether llama.cpp
# permuted the Q/K rows.
_ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("LlamaForCausalLM", True),
    "mistral": ("MistralForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
    "qwen3": ("Qwen3ForCausalLM", False),
    "gemma3": ("Gemma3ForCausalLM", False),
}
# GGUF architecture -> HF model_type, where they differ.
_MODEL_TYPES = {"gemma3": "gemma3_text"}

_TOP_LEVEL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                      "output": "lm_head"}
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3 names its norms differently: ffn_norm is the norm before the MLP there.
_GEMMA3_BLOCK_TENSORS = dict(_BLOCK_TENSORS, ffn_norm="pre_feedforward_layernorm",
                             post_attention_norm="post_attention_layernorm",
                             post_ffw_norm="post_feedforward_layernorm")
_SKIPPED_TENSORS = {"rope_freqs.weight"}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")

# GGUF rope-scaling metadata key (after "{arch}.rope.scaling.") -> HF rope_scaling key.
_ROPE_SCALING_KEYS = {
    "factor": "factor",
    "original_context_length": "original_max_position_embeddings",
    "attn_factor": "attention_factor",
    "yarn_beta_fast": "beta_fast",
    "yarn_beta_slow": "beta_slow",
    "low_freq_factor": "low_freq_factor",
    "high_freq_factor": "high_freq_factor",
}

# Strings the saved tokenizer must encode exactly like the GGUF-built one.
_TOKENIZER_PROBES = ("Hello, world!", "12345 + 678 = 13023", "  two spaces\tand a tab\n",
                     "naïve café, 日本語, emoji 🙂")



@functools.cache
def _reader_class() -> type:
    import gguf

    class FastGGUFReader(gguf.GGUFReader):
        """GGUFReader over a plain ndarray view of its memory map.

        GGUFReader slices its np.memmap ~10^6 times while parsing the token lists, and
        every memmap slice pays for memmap.__array_finalize__; a plain view of the same
        mapping parses 2.5x faster (SmolLM2: 5.1 s -> 1.9 s). Also remembers its path.
        """

        def __init__(self, path: Path) -> None:
            self.path = Path(path)
            super().__init__(path)

        @property
        def data(self) -> np.ndarray:
            return self._data

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._data = value.view(np.ndarray)

    return FastGGUFReader


def open_gguf(path: Path) -> "gguf.GGUFReader":
    """Open and validate a GGUF file; any defect is a one-line ValueError naming it."""
    try:
        reader = _reader_class()(path)
    except Exception as e:  # the reader raises ValueError, IndexError, KeyError, ...
        raise ValueError(f"{path}: not a valid GGUF file ({one_line(e)})") from e
    for tensor in reader.tensors:
        if tensor.data.nbytes != int(tensor.n_bytes):
            raise ValueError(f"{path}: truncated GGUF file (tensor {tensor.name} is cut short)")
    return reader


def _field(reader: "gguf.GGUFReader", key: str, default: Any = None) -> Any:
    """A scalar or string metadata value."""
    import gguf

    field = reader.fields.get(key)
    if field is None:
        return default
    if field.types[0] == gguf.GGUFValueType.ARRAY:
        raise ValueError(f"{reader.path}: GGUF metadata {key} is an array, expected one value")
    part = field.parts[field.data[0]]
    if field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    return part.tolist()[0]


def _f32(value: float) -> float:
    """GGUF floats are float32: keep the shortest decimal that rounds to the same float32."""
    return float(str(np.float32(value)))


def _architecture(reader: "gguf.GGUFReader", path: Path) -> str:
    arch = _field(reader, "general.architecture")
    name = str(_field(reader, "general.name", "")).lower()
    if arch == "llama" and "mistral" in name:
        return "mistral"  # llama.cpp files Mistral models under "llama"
    if arch not in _ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch!r} in {path} "
                         f"(supported: {', '.join(_ARCHITECTURES)})")
    return arch


def config_dict(reader: "gguf.GGUFReader", path: Path) -> dict[str, Any]:
    """The HF config.json dict for a GGUF file."""
    gguf_arch = _architecture(reader, path)
    model_type = _MODEL_TYPES.get(gguf_arch, gguf_arch)
    arch = _field(reader, "general.architecture")

    def meta(key: str, default: Any = None) -> Any:
        value = _field(reader, f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{path}: GGUF metadata {arch}.{key} is missing")
        return value

    names = {t.name for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise ValueError(f"{path}: GGUF file has no token_embd.weight tensor")
    vocab_size = int(_tensor_shape(reader, "token_embd.weight")[0])
    hidden, heads = meta("embedding_length"), meta("attention.head_count")
    head_dim = meta("attention.key_length", meta("rope.dimension_count", hidden // heads))
    eos_ids = _eos_token_ids(reader)
    cfg: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[gguf_arch][0]],
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": meta("feed_forward_length"),
        "num_hidden_layers": meta("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": meta("context_length", 4096),
        "rms_norm_eps": _f32(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32(meta("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(reader, arch, path),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }
    if model_type == "mistral":
        cfg["sliding_window"] = None
    if model_type in ("qwen2", "qwen3"):
        cfg.update(use_sliding_window=False, sliding_window=None)
    if model_type == "gemma3_text":
        cfg.update(hidden_activation="gelu_pytorch_tanh", sliding_window=meta("attention.sliding_window", 4096),
                   rope_local_base_freq=10000.0, query_pre_attn_scalar=head_dim, sliding_window_pattern=6,
                   final_logit_softcapping=_field(reader, f"{arch}.final_logit_softcapping"),
                   attn_logit_softcapping=_field(reader, f"{arch}.attn_logit_softcapping"))
        del cfg["hidden_act"]
    return cfg


def _eos_token_ids(reader: "gguf.GGUFReader") -> list[int]:
    """eos, then end-of-turn / end-of-message ids when the file names other ones."""
    ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = _field(reader, f"tokenizer.ggml.{key}")
        if value is not None and value not in ids:
            ids.append(value)
    return ids


def _rope_scaling(reader: "gguf.GGUFReader", arch: str, path: Path) -> dict[str, Any] | None:
    prefix = f"{arch}.rope.scaling."
    kind = _field(reader, prefix + "type")
    if kind in (None, "none"):
        if any(t.name == "rope_freqs.weight" for t in reader.tensors):
            log.warning("%s: ignoring the rope_freqs tensor (llama3-style rope scaling "
                        "without metadata); the model runs with plain rope", path)
        return None
    scaling: dict[str, Any] = {"rope_type": kind}
    for gguf_key, hf_key in _ROPE_SCALING_KEYS.items():
        value = _field(reader, prefix + gguf_key)
        if value is not None:
            scaling[hf_key] = _f32(value) if isinstance(value, float) else value
    return scaling


def generation_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {k: hf_config[k] for k in keys if hf_config.get(k) is not None}


# ---------------------------------------------------------------------------- tensors


def _tensor_shape(reader: "gguf.GGUFReader", name: str) -> tuple[int, ...]:
    """HF shape (out, in) of a GGUF tensor; GGUF lists dimensions innermost first."""
    tensor = next(t for t in reader.tensors if t.name == name)
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str | None:
    """HF name for a GGUF tensor name; None for tensors that are skipped."""
    if gguf_name in _SKIPPED_TENSORS:
        return None
    stem, _, kind = gguf_name.rpartition(".")
    if stem in _TOP_LEVEL_TENSORS and kind in ("weight", "bias"):
        return f"{_TOP_LEVEL_TENSORS[stem]}.{kind}"
    block_tensors = _GEMMA3_BLOCK_TENSORS if arch == "gemma3" else _BLOCK_TENSORS
    match = _BLOCK_RE.match(gguf_name)
    if match and match.group(2) in block_tensors:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{block_tensors[part]}.{kind}"
    raise KeyError(gguf_name)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation for rope:
    w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert_tensors(reader: "gguf.GGUFReader", hf_config: dict[str, Any],
                     path: Path) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize
    from tqdm import tqdm

    arch = _architecture(reader, path)
    permuted = _ARCHITECTURES[arch][1]
    heads = {"q_proj": hf_config["num_attention_heads"],
             "k_proj": hf_config["num_key_value_heads"]}
    tensors: dict[str, torch.Tensor] = {}
    for tensor in tqdm(reader.tensors, desc=f"converting {path.name}", unit="tensor",
                       file=sys.stderr):
        try:
            name = hf_tensor_name(tensor.name, arch)
        except KeyError:
            raise ValueError(f"{path}: unexpected tensor {tensor.name!r} for "
                             f"{hf_config['model_type']}") from None
        if name is None:
            continue
        try:
            w = dequantize(tensor.data, tensor.tensor_type)
        except (NotImplementedError, ValueError) as e:
            raise ValueError(f"{path}: cannot dequantize {tensor.name} "
                             f"({tensor.tensor_type.name}): {one_line(e)}") from e
        w = w.astype(np.float32) if w.dtype != np.float32 else w
        w = w.reshape(tuple(reversed(tensor.shape.tolist())))
        proj = name.split(".")[-2]
        if permuted and proj in heads:
            w = unpermute_qk(w, heads[proj])
        if arch == "gemma3" and tensor.name.endswith("norm.weight"):
            w = w - np.float32(1.0)  # llama.cpp stores Gemma's RMSNorm weight as 1 + w
        tensors[name] = torch.from_numpy(np.array(w, dtype=np.float32, order="C"))
    return tensors


# ---------------------------------------------------------------------------- tokenizer


def save_tokenizer(reader: "gguf.GGUFReader", gguf_path: Path, out_dir: Path) -> None:
    """Build the tokenizer from the GGUF metadata with transformers and save it."""
    if _field(reader, "tokenizer.ggml.model") is None:
        log.warning("%s has no tokenizer metadata; the converted folder has no tokenizer",
                    gguf_path)
        return
    print(f"converting the tokenizer of {gguf_path.name}", file=sys.stderr)
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # quiet "some keys were not parsed" chatter
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tokenizer.save_pretrained(str(out_dir))
        saved = AutoTokenizer.from_pretrained(str(out_dir))
    finally:
        hf_logging.set_verbosity(verbosity)
    _check_same_tokenizer(tokenizer, saved, gguf_path)


def _check_same_tokenizer(original: Any, saved: Any, gguf_path: Path) -> None:
    probes = list(_TOKENIZER_PROBES)
    if original.chat_template:
        probes.append(original.apply_chat_template(
            [{"role": "user", "content": "What is 2+2?"}], tokenize=False,
            add_generation_prompt=True))
    for text in probes:
        if original(text)["input_ids"] != saved(text)["input_ids"]:
            raise RuntimeError(f"{gguf_path}: the saved tokenizer encodes {text!r} differently")
    if original.chat_template != saved.chat_template:
        raise RuntimeError(f"{gguf_path}: the chat template was lost when saving the tokenizer")


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
