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
from .layers import AttentionMetadata, Rotary, linear, load_projections, paged_attention, write_kv
from .quant import QuantWeight, model_weight_bytes, prepare_linears


class GemmaRMSNorm(torch.nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(dim, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


class Gemma3Layer(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, sliding: bool, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        self.window = cfg.sliding_window if sliding else None
        norm = lambda dim: GemmaRMSNorm(dim, cfg.rms_norm_eps, dtype, device)  # noqa: E731
        self.input_norm, self.post_attn_norm = norm(cfg.hidden_size), norm(cfg.hidden_size)
        self.pre_ff_norm, self.post_ff_norm = norm(cfg.hidden_size), norm(cfg.hidden_size)
        self.q_norm, self.k_norm = norm(cfg.head_dim), norm(cfg.head_dim)
        # Filled by Gemma3Model.load_weights.
        self.qkv_weight: torch.Tensor | QuantWeight
        self.qkv_bias: torch.Tensor | None = None
        self.o_weight: torch.Tensor | QuantWeight
        self.gate_up_weight: torch.Tensor | QuantWeight
        self.down_weight: torch.Tensor | QuantWeight

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: Rotary,
                kv: tuple[torch.Tensor, ...], meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        qkv = linear(self.input_norm(x), self.qkv_weight, self.qkv_bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.reshape(t, self.num_heads, self.head_dim))
        k = self.k_norm(k.reshape(t, self.num_kv_heads, self.head_dim))
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        q, k = rotary(q, k, positions)
        kv_scales = (kv[2], kv[3]) if len(kv) == 4 else None  # an int8 cache carries its scales
        write_kv(kv[0], kv[1], k, v, meta.slot_mapping, kv_scales)
        attn = paged_attention(q, kv[0], kv[1], meta, self.scale, kv_scales, self.window)
        x = x + self.post_attn_norm(linear(attn.reshape(t, self.q_size), self.o_weight))
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
        def take(name: str) -> torch.Tensor:
            if name not in weights:
                raise ValueError(f"weights are missing tensor {name!r}")
            return weights[name].to(device=self.device, dtype=self.dtype).contiguous()

        self.embed = take("model.embed_tokens.weight")
        untied = "lm_head.weight" in weights and not self.cfg.tie_word_embeddings
        self.lm_head = take("lm_head.weight") if untied else self.embed
        self.norm.weight.copy_(take("model.norm.weight"))
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            load_projections(layer, take, p, self.cfg.attention_bias)
            for norm, name in ((layer.input_norm, "input_layernorm"), (layer.post_attn_norm, "post_attention_layernorm"),
                               (layer.pre_ff_norm, "pre_feedforward_layernorm"),
                               (layer.post_ff_norm, "post_feedforward_layernorm"),
                               (layer.q_norm, "self_attn.q_norm"), (layer.k_norm, "self_attn.k_norm")):
                norm.weight.copy_(take(p + name + ".weight"))
        prepare_linears(self, self.quantization)

    def weight_bytes(self) -> int:
        return model_weight_bytes(self)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, ...]], meta: AttentionMetadata) -> torch.Tensor:
        x = F.embedding(input_ids, self.embed) * self.embed_scale
        for layer, sliding, kv in zip(self.layers, self.sliding, kv_caches):
            x = layer(x, positions, self.local_rotary if sliding else self.rotary, kv, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = linear(hidden, self.lm_head).float()
        cap = self.cfg.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
