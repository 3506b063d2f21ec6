"""Settings for models, the KV cache, the scheduler and the server.

Plain data and the parsing of user-given values (sizes, quantization names). The device,
the dtype and the CPU kernel paths are decided in `tuili.device`. Nothing here imports
`tuili.model`, and importing this module does not import torch (the CLI parses its flags,
and the planner answers, without paying for it).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_MODEL", "SUPPORTED_ARCHITECTURES", "QUANT_MODES", "INT4_GROUP_SIZES", "ModelConfig",
           "SchedulerConfig", "EngineConfig", "parse_size", "parse_quantization", "cache_dir"]

DEFAULT_MODEL = "smollm2-135m-instruct"  # served when no model is named

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12,
          "tib": 2**40}


def parse_size(value: str | int) -> int:
    """'2GiB' -> 2147483648; plain integers are bytes."""
    if isinstance(value, int):
        return value
    m = _SIZE_RE.match(str(value))
    unit = (m.group(2) or "").lower() if m else None
    if not m or unit not in _UNITS:
        raise ValueError(f"size: cannot parse {value!r}; write it like 512MiB or 2GiB")
    return int(float(m.group(1)) * _UNITS[unit])


QUANT_MODES = ("none", "int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128)


def parse_quantization(value: str | None) -> tuple[str, int]:
    """'int8', 'int4' (group 32 by default), 'int4:64' or 'int4-g128' -> (mode, group size)."""
    if value in (None, "", "none"):
        return "none", 0
    text = value.lower().replace("-g", ":").replace("_g", ":")
    mode, _, group = text.partition(":")
    if mode == "int8" and not group:
        return "int8", 0
    if mode == "int4":
        size = int(group) if group.isdigit() else (32 if not group else -1)
        if size in INT4_GROUP_SIZES:
            return "int4", size
        raise ValueError(f"quantization: int4 group size must be one of {INT4_GROUP_SIZES}, got {group!r}")
    raise ValueError(f"quantization: unknown value {value!r}; use none, int8, int4, int4:64 or int4:128")


def cache_dir() -> Path:
    """Where converted models live: $TUILI_CACHE, default ~/.cache/tuili."""
    return Path(os.environ.get("TUILI_CACHE", Path.home() / ".cache" / "tuili"))


@dataclass
class ModelConfig:
    """The shape of a decoder-only transformer, independent of the file it came from."""

    architecture: str  # one of SUPPORTED_ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # HF form, e.g. {"rope_type": "llama3", ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm on q and k per head (Qwen3)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # Gemma 3 (gemma3_text): sliding-window layers with their own rope base, a query scale
    # other than head_dim**-0.5, and softcapped logits.
    layer_types: list[str] | None = None  # per layer "sliding_attention" or "full_attention"
    sliding_window: int | None = None
    rope_local_theta: float | None = None  # rope base of sliding-window layers
    query_pre_attn_scalar: float | None = None  # attention scale is its inverse square root
    final_logit_softcapping: float | None = None

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Build from a Hugging Face config.json dict; unsupported architectures raise ValueError."""
        model_type = cfg.get("model_type", "")
        if model_type == "gemma3" and isinstance(cfg.get("text_config"), dict):
            cfg = dict(cfg["text_config"], model_type="gemma3_text")  # the text part of Gemma 3
            model_type = "gemma3_text"
        if model_type not in SUPPORTED_ARCHITECTURES:
            archs = cfg.get("architectures") or [model_type or "unknown"]
            raise ValueError(f"unsupported architecture {archs[0]!r} (model_type {model_type!r}); "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        rope_params = cfg.get("rope_parameters") or {}
        rope_scaling = cfg.get("rope_scaling") or None
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = dict(rope_params)
        theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else (list(eos) if isinstance(eos, list) else [eos])
        gemma = _gemma3_fields(cfg, len_layers=cfg["num_hidden_layers"]) if model_type == "gemma3_text" else {}
        if gemma:
            theta, rope_scaling = gemma.pop("rope_theta"), gemma.pop("rope_scaling")
        return cls(
            architecture=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", model_type == "gemma3_text")),
            attention_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            **gemma,
        )


def _gemma3_fields(cfg: dict[str, Any], len_layers: int) -> dict[str, Any]:
    """Gemma 3's extra settings from a config.json, in either of transformers' two forms:
    `rope_parameters` per layer type (transformers 5), or rope_theta / rope_local_base_freq /
    rope_scaling / sliding_window_pattern (older files, and GGUF conversions)."""
    if cfg.get("attn_logit_softcapping") is not None:
        raise ValueError("attention logit softcapping (attn_logit_softcapping) is not supported")
    if cfg.get("use_bidirectional_attention"):
        raise ValueError("bidirectional attention (use_bidirectional_attention) is not supported")
    params = cfg.get("rope_parameters") or {}
    full = dict(params.get("full_attention") or {})
    local = dict(params.get("sliding_attention") or {})
    theta = float(full.get("rope_theta", cfg.get("rope_theta", 1_000_000.0)))
    local_theta = float(local.get("rope_theta", cfg.get("rope_local_base_freq", 10_000.0)))
    scaling = cfg.get("rope_scaling") or None
    if scaling is None and full.get("rope_type", "default") != "default":
        scaling = full
    if local.get("rope_type", "default") != "default":
        raise ValueError(f"rope scaling on sliding-window layers ({local['rope_type']!r}) is not supported")
    layer_types = cfg.get("layer_types")
    if layer_types is None:
        pattern = cfg.get("sliding_window_pattern", 6)
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(len_layers)]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return dict(rope_theta=theta, rope_scaling=scaling, layer_types=list(layer_types),
                sliding_window=cfg.get("sliding_window"), rope_local_theta=local_theta,
                query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar") or head_dim),
                final_logit_softcapping=cfg.get("final_logit_softcapping"))


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    # Largest chunk one prefill may take in a step (None: the whole budget).
    long_prefill_token_threshold: int | None = None

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens: must be >= 1, got {self.max_num_batched_tokens}")


@dataclass
class EngineConfig:
    """Everything one model's engine needs besides the weights."""

    dtype: str = "auto"
    device: str = "auto"
    block_size: int = 16
    kv_cache_memory: str | int = "1GiB"
    num_kv_blocks: int | None = None  # overrides kv_cache_memory when set
    max_num_seqs: int = 256
    # Tokens per step; None: 2048 on CUDA, 512 on a CPU. A CPU step is compute-bound long
    # before 512 tokens (a 512-token step of the default model takes about a second here),
    # so a larger budget only makes a burst of requests wait for one long step. Measured
    # (docs/BENCHMARKS.md, peers): 16 concurrent streams, TTFT p50 8.5 s with 2048 and
    # 2.7 s with 512, output 78 -> 96 tok/s.
    max_num_batched_tokens: int | None = None
    long_prefill_token_threshold: int | None = None
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    seed: int | None = None  # seeds the sampler of requests that bring no seed
    quantization: str = "none"  # weights: none, int8, int4 (group 32), int4:64, int4:128
    kv_cache_dtype: str = "auto"  # auto (the model dtype) or int8 (a scale per token and head)
    # KV tiers behind the pool (engine/tiers.py). Host memory is off by default: on a CPU
    # device the pool already is host memory. The disk tier is on when a directory is given.
    kv_host_memory: str | int = 0
    kv_disk_dir: str | None = None
    kv_disk_size: str | int = "20GiB"
    # Speculative decoding (engine/speculative.py): "ngram" drafts tokens from n-gram matches
    # in the prompt and output so far; "auto" (default) drafts where doing so cannot change a
    # token (a row's products do not depend on the row count: speculative.resolve_method).
    speculative: str = "auto"
    speculative_tokens: int = 5  # most draft tokens per sequence and step
    # Draft only while at most this many sequences run (None: no limit). Without one, how
    # many drafts a step verifies follows what its rows cost and how often drafts land.
    speculative_max_batch: int | None = None

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size: must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks: must be >= 1, got {self.num_kv_blocks}")
        parse_size(self.kv_cache_memory)
        for name in ("kv_host_memory", "kv_disk_size"):
            try:
                parse_size(getattr(self, name))
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens: must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len: must be >= 2, got {self.max_model_len}")
        parse_quantization(self.quantization)
        if self.kv_cache_dtype not in ("auto", "int8"):
            raise ValueError(f"kv_cache_dtype: unknown value {self.kv_cache_dtype!r}; use auto or int8")
        if self.speculative not in ("auto", "none", "ngram"):
            raise ValueError(f"speculative: unknown value {self.speculative!r}; use auto, none or ngram")
        if not isinstance(self.speculative_tokens, int) or self.speculative_tokens < 1:
            raise ValueError(f"speculative_tokens: must be an integer >= 1, got {self.speculative_tokens!r}")
        if self.speculative_max_batch is not None and (
                not isinstance(self.speculative_max_batch, int) or self.speculative_max_batch < 1):
            raise ValueError(f"speculative_max_batch: must be an integer >= 1, got {self.speculative_max_batch!r}")

    def scheduler_config(self) -> SchedulerConfig:
        budget = self.max_num_batched_tokens
        if budget is None:
            from .device import resolve_device  # torch only once an engine is being built

            budget = 2048 if resolve_device(self.device).type == "cuda" else 512
        return SchedulerConfig(self.max_num_seqs, budget, self.long_prefill_token_threshold)
