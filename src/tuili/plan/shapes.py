"""A model's sizes as the planner needs them: parameters, bytes, FLOPs and KV per token.

Read straight from a Hugging Face config.json dict, without torch: `tuili.config` imports
torch (through `tuili.device`), and the planner answers in well under a second, so it
reads the few fields it needs itself (tests check it against `ModelConfig.from_hf_config`
for the dense architectures tuili runs). Mixture-of-experts configs (Mixtral's
`num_local_experts`, Qwen-MoE's `num_experts` / `moe_intermediate_size`) are accepted:
memory counts every expert, FLOPs count the `num_experts_per_tok` active ones, and bytes
read per step count the experts a batch touches (see `expert_fraction`).

Byte formats follow tuili's engine: the embedding table stays 16-bit; every linear layer,
the output head included (a tied head gets its own quantized copy), takes the weight
format; int8 weights carry a float32 scale per output row; the KV cache is 16-bit, or
int8 with a float32 scale per token and head.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import cache_dir

CONFIG_DIR = Path(__file__).parent / "configs"
DENSE_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3", "gemma2", "phi3")
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")


@dataclass(frozen=True)
class ModelShape:
    name: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP width, or one expert's width for MoE
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    num_experts: int = 0  # 0: dense
    experts_per_token: int = 0
    shared_expert_size: int = 0  # width of an always-on shared expert (Qwen2-MoE), 0 if none
    sliding_window: int | None = None
    num_sliding_layers: int = 0
    attention_bias: bool = False

    # --- parameters ---------------------------------------------------------------
    @property
    def attn_params_per_layer(self) -> int:
        q = self.hidden_size * self.num_heads * self.head_dim
        kv = 2 * self.hidden_size * self.num_kv_heads * self.head_dim
        return q + kv + self.num_heads * self.head_dim * self.hidden_size

    @property
    def mlp_params_per_layer(self) -> int:
        """All MLP weights of a layer (every expert, the router and any shared expert)."""
        one = 3 * self.hidden_size * self.intermediate_size
        if not self.num_experts:
            return one
        return self.num_experts * one + self.hidden_size * self.num_experts + 3 * self.hidden_size * self.shared_expert_size

    @property
    def active_mlp_params_per_layer(self) -> int:
        one = 3 * self.hidden_size * self.intermediate_size
        if not self.num_experts:
            return one
        return self.experts_per_token * one + self.hidden_size * self.num_experts + 3 * self.hidden_size * self.shared_expert_size

    @property
    def linear_params(self) -> int:
        """Weights of the transformer layers' linear maps (output head excluded)."""
        return self.num_layers * (self.attn_params_per_layer + self.mlp_params_per_layer)

    @property
    def active_linear_params(self) -> int:
        return self.num_layers * (self.attn_params_per_layer + self.active_mlp_params_per_layer)

    @property
    def head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        """As a model card counts them: embedding, layers, and an untied head."""
        return self.head_params * (1 if self.tie_word_embeddings else 2) + self.linear_params

    @property
    def active_params(self) -> int:
        return self.head_params * (1 if self.tie_word_embeddings else 2) + self.active_linear_params

    def expert_fraction(self, rows: int) -> float:
        """Share of the experts' weights a step of `rows` tokens reads: each token picks k of E
        experts, so E * (1 - (1 - k/E)^rows) distinct experts are expected per layer."""
        if not self.num_experts or rows <= 0:
            return 1.0 if not self.num_experts else 0.0
        e, k = self.num_experts, self.experts_per_token
        return 1.0 - (1.0 - k / e) ** rows

    # --- bytes ------------------------------------------------------------------------
    def weight_bytes(self, quantization: str = "none", int4_bytes_per_param: float = 0.75) -> int:
        """Bytes the engine holds: 16-bit embedding plus the quantized layers and head."""
        return int(self.head_params * 2 + self.linear_weight_bytes(quantization, int4_bytes_per_param)
                   + self.head_weight_bytes(quantization, int4_bytes_per_param))

    def linear_weight_bytes(self, quantization: str, int4_bytes_per_param: float = 0.75) -> float:
        return self._bytes(self.linear_params, self._rows_per_layer() * self.num_layers, quantization,
                           int4_bytes_per_param)

    def head_weight_bytes(self, quantization: str, int4_bytes_per_param: float = 0.75) -> float:
        return self._bytes(self.head_params, self.vocab_size, quantization, int4_bytes_per_param)

    def read_bytes_per_step(self, rows: int, quantization: str, int4_bytes_per_param: float = 0.75) -> float:
        """Weight bytes one step reads: every linear layer once (for MoE only the experts the
        step's rows touch) and the output head (the embedding is a row lookup)."""
        linear = self.linear_weight_bytes(quantization, int4_bytes_per_param)
        if self.num_experts:
            experts = self.num_layers * self.num_experts * 3 * self.hidden_size * self.intermediate_size
            expert_bytes = linear * experts / self.linear_params
            linear = linear - expert_bytes + expert_bytes * self.expert_fraction(rows)
        return linear + self.head_weight_bytes(quantization, int4_bytes_per_param)

    def _rows_per_layer(self) -> int:
        attn = self.num_heads * self.head_dim + 2 * self.num_kv_heads * self.head_dim + self.hidden_size
        mlp = 3 * self.intermediate_size if not self.num_experts else self.num_experts * 3 * self.intermediate_size
        return attn + mlp

    @staticmethod
    def _bytes(params: int, rows: int, quantization: str, int4_bytes_per_param: float) -> float:
        if quantization == "int8":
            return params + 4 * rows
        if quantization == "int4":
            return params * int4_bytes_per_param
        return 2 * params

    def kv_bytes_per_token(self, kv_cache_dtype: str = "auto") -> int:
        """K and V of one token in every layer (tuili keeps every layer's KV in one pool)."""
        per_head = self.head_dim + 4 if kv_cache_dtype == "int8" else 2 * self.head_dim
        return 2 * self.num_layers * self.num_kv_heads * per_head

    def kv_read_bytes(self, context: float, kv_cache_dtype: str = "auto") -> float:
        """KV bytes one decode token reads at `context` tokens (sliding layers read their window)."""
        per_layer = self.kv_bytes_per_token(kv_cache_dtype) / self.num_layers
        full = self.num_layers - self.num_sliding_layers
        window = min(context, self.sliding_window) if self.sliding_window else context
        return per_layer * (full * context + self.num_sliding_layers * window)

    # --- FLOPs --------------------------------------------------------------------------
    def attention_flops(self, new_tokens: int, start: int) -> float:
        """QK^T and PV FLOPs for `new_tokens` causal tokens after `start` cached ones."""
        pairs_full = new_tokens * start + new_tokens * (new_tokens + 1) / 2
        per_pair = 4 * self.num_heads * self.head_dim
        full = self.num_layers - self.num_sliding_layers
        total = full * pairs_full
        if self.num_sliding_layers:
            w = self.sliding_window or 0
            total += self.num_sliding_layers * min(pairs_full, new_tokens * w)
        return per_pair * total


def load_config(model: str) -> tuple[str, dict[str, Any]]:
    """(display name, config dict) for a config.json, an HF folder or a known model name.

    Known names are looked up in the configs shipped with the planner, then in tuili's
    converted-model cache; only as a last resort is `tuili.model.loader` asked to convert a
    known GGUF (which imports torch)."""
    path = Path(model).expanduser()
    if path.is_file():
        return path.parent.name if path.name == "config.json" else path.stem, _read(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: folder has no config.json")
        return path.name, _read(path / "config.json")
    shipped = CONFIG_DIR / f"{model}.json"
    if shipped.is_file():
        return model, _read(shipped)
    cache = cache_dir() / "models" / model / "config.json"
    if cache.is_file():
        return model, _read(cache)
    try:
        from ..model.loader import resolve_model_path  # converts a known GGUF; imports torch
        return model, _read(resolve_model_path(model) / "config.json")
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise FileNotFoundError(f"{model}: not a config.json, an HF folder or a known model name "
                                f"(shipped configs: {', '.join(shipped_models())}); {e}") from None


def shipped_models() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def shape_from_config(cfg: dict[str, Any], name: str = "model") -> ModelShape:
    model_type = cfg.get("model_type", "")
    if isinstance(cfg.get("text_config"), dict):  # multimodal wrappers (Gemma 3): the text model
        cfg = dict(cfg["text_config"], model_type=cfg["text_config"].get("model_type", model_type + "_text"))
        model_type = cfg["model_type"]
    if model_type not in DENSE_TYPES + MOE_TYPES and not cfg.get("num_local_experts") and not cfg.get("num_experts"):
        if not all(k in cfg for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")):
            raise ValueError(f"{name}: config of model_type {model_type!r} lacks the fields of a decoder-only transformer")
    heads = cfg["num_attention_heads"]
    hidden = cfg["hidden_size"]
    layers = cfg["num_hidden_layers"]
    experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
    width = cfg.get("moe_intermediate_size") if experts and cfg.get("moe_intermediate_size") else cfg["intermediate_size"]
    sliding, window = _sliding_layers(cfg, model_type, layers)
    return ModelShape(
        name=name, architecture=model_type, vocab_size=cfg["vocab_size"], hidden_size=hidden,
        intermediate_size=int(width), num_layers=layers, num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=cfg.get("head_dim") or hidden // heads,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", model_type.startswith("gemma"))),
        num_experts=experts, experts_per_token=int(cfg.get("num_experts_per_tok") or 0) if experts else 0,
        shared_expert_size=int(cfg.get("shared_expert_intermediate_size") or 0) if experts else 0,
        sliding_window=window if sliding else None, num_sliding_layers=sliding,
        attention_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
    )


def _sliding_layers(cfg: dict[str, Any], model_type: str, layers: int) -> tuple[int, int | None]:
    """(number of sliding-window layers, window). Gemma 3: five local layers in six by default."""
    window = cfg.get("sliding_window")
    if not window:
        return 0, None
    types = cfg.get("layer_types")
    if types:
        return sum(t == "sliding_attention" for t in types), int(window)
    if model_type.startswith("gemma3"):
        pattern = cfg.get("sliding_window_pattern", 6)
        return sum(1 for i in range(layers) if (i + 1) % pattern), int(window)
    if cfg.get("use_sliding_window", model_type == "mistral"):
        return layers, int(window)
    return 0, None


def load_shape(model: str) -> ModelShape:
    name, cfg = load_config(model)
    return shape_from_config(cfg, name)
