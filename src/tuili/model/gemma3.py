"""Gemma 3 text models (gemma3_text; the 270M, 1B and the text part of larger ones) over the paged KV cache.

What differs from the Llama family, following transformers' Gemma3 code step by step:
- the embedding is multiplied by sqrt(hidden_size), rounded to the model dtype first;
- RMSNorm scales by (1 + weight), computed in float32 before the cast back (HF stores
  the weight centred on 0; llama.cpp's GGUF stores 1 + weight, and the loader subtracts
  the 1 on conversion, as transformers does);
- q and k get a per-head RMSNorm before rope; each layer has four norms: input,
  post-attention (on the attention output, before the residual add), pre-feedforward and
  post-feedforward;
- the MLP is gated with gelu (tanh approximation) instead of silu;
- attention is scaled by query_pre_attn_scalar**-0.5;
- layers are "sliding_attention" (a query sees the last `sliding_window` positions; rope
  base rope_local_theta, no scaling) or "full_attention" (rope_theta, with rope scaling
  if any). Sliding layers still keep all their K/V in the cache: one KV layout for every
  layer, at the price of memory a ring buffer would save;
- final logits are softcapped (cap * tanh(logits / cap)) when final_logit_softcapping is set.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from .layers import AttentionLayer, AttentionMetadata, RMSNorm, Rotary, linear, tap, weight_taker
from .quant import model_weight_bytes, prepare_linears


class GemmaRMSNorm(RMSNorm):
    """Scales by (1 + weight), in float32 before the cast back; the weight is centred on 0."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device):
        super().__init__(dim, eps, dtype, device, init=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.normalize(x) * (1.0 + self.weight.float())).to(x.dtype)


class Gemma3Layer(AttentionLayer):
    def __init__(self, cfg: ModelConfig, sliding: bool, dtype: torch.dtype, device: torch.device):
        norm = lambda dim: GemmaRMSNorm(dim, cfg.rms_norm_eps, dtype, device)  # noqa: E731
        super().__init__(cfg, (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5,
                         window=cfg.sliding_window if sliding else None, qk_norm=norm)
        self.input_norm, self.post_attn_norm = norm(cfg.hidden_size), norm(cfg.hidden_size)
        self.pre_ff_norm, self.post_ff_norm = norm(cfg.hidden_size), norm(cfg.hidden_size)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: Rotary,
                kv: tuple[torch.Tensor, ...], meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.post_attn_norm(self.attention(self.input_norm(x), positions, rotary, kv, meta))
        gate, up = linear(self.pre_ff_norm(x), self.gate_up_weight).chunk(2, dim=-1)
        h = linear(F.gelu(gate, approximate="tanh") * up, self.down_weight)
        return x + self.post_ff_norm(h)


class Gemma3Model(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                 max_positions: int | None = None, quantization: tuple[str, int] = ("none", 0)):
        super().__init__()
        self.cfg, self.dtype, self.device = cfg, dtype, device
        self.quantization = quantization
        types = cfg.layer_types or ["full_attention"] * cfg.num_layers
        if len(types) != cfg.num_layers or set(types) - {"sliding_attention", "full_attention"}:
            raise ValueError(f"layer_types: expected {cfg.num_layers} of sliding_attention/full_attention")
        self.sliding = [t == "sliding_attention" and cfg.sliding_window is not None for t in types]
        self.layers = torch.nn.ModuleList(Gemma3Layer(cfg, s, dtype, device) for s in self.sliding)
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        n = max_positions or cfg.max_position_embeddings
        self.rotary = Rotary(cfg, n, dtype, device)
        local = dataclasses.replace(cfg, rope_theta=cfg.rope_local_theta or cfg.rope_theta, rope_scaling=None)
        self.local_rotary = Rotary(local, n, dtype, device)
        # As transformers: sqrt(hidden) in float32, then rounded to the model dtype.
        self.embed_scale = torch.tensor(cfg.hidden_size ** 0.5, dtype=dtype, device=device)
        self.embed: torch.Tensor
        self.lm_head: torch.Tensor

    @torch.inference_mode()
    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Take HF-named tensors, fuse q/k/v and gate/up, cast to the model dtype and device."""
        take = weight_taker(weights, self.dtype, self.device)
        self.embed = take("model.embed_tokens.weight")
        untied = "lm_head.weight" in weights and not self.cfg.tie_word_embeddings
        self.lm_head = take("lm_head.weight") if untied else self.embed
        self.norm.weight.copy_(take("model.norm.weight"))
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            layer.load_projections(take, p, self.cfg.attention_bias)
            for norm, name in ((layer.input_norm, "input_layernorm"), (layer.post_attn_norm, "post_attention_layernorm"),
                               (layer.pre_ff_norm, "pre_feedforward_layernorm"),
                               (layer.post_ff_norm, "post_feedforward_layernorm")):
                norm.weight.copy_(take(p + name + ".weight"))
        prepare_linears(self, self.quantization)

    def weight_bytes(self) -> int:
        return model_weight_bytes(self)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, ...]], meta: AttentionMetadata) -> torch.Tensor:
        x = F.embedding(input_ids, self.embed) * self.embed_scale
        tap(meta, 0, x)
        for i, (layer, sliding, kv) in enumerate(zip(self.layers, self.sliding, kv_caches)):
            x = layer(x, positions, self.local_rotary if sliding else self.rotary, kv, meta)
            tap(meta, i + 1, x)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = linear(hidden, self.lm_head).float()
        cap = self.cfg.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
