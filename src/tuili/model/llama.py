"""The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2/2.5, Qwen3) over a paged KV cache.

One model serves all of them; the differences are flags on `ModelConfig`:
q/k/v bias (Qwen2), per-head q/k RMSNorm (Qwen3), head_dim not equal to hidden/heads
(Qwen3), tied embeddings, and rope scaling. Weights arrive under Hugging Face names and
are fused at load time (q/k/v into one matmul, gate/up into another) so a layer runs
four matmuls instead of seven.

The forward pass takes a flat batch of tokens (decodes first, then prefill chunks) and
returns hidden states; the caller picks the rows it needs logits for.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from .kernels import cpu_kernels
from .layers import (AttentionLayer, AttentionMetadata, RMSNorm, Rotary, cache_scales, linear, paged_attention,
                     tap, weight_taker)
from .quant import PackedInt4Weight, PackedWeight, model_weight_bytes, prepare_linears


class DecoderLayer(AttentionLayer):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device):
        norm = (lambda dim: RMSNorm(dim, cfg.rms_norm_eps, dtype, device)) if cfg.qk_norm else None
        super().__init__(cfg, cfg.head_dim ** -0.5, qk_norm=norm)
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: Rotary,
                kv: tuple[torch.Tensor, ...], meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.attention(self.input_norm(x), positions, rotary, kv, meta)
        gate, up = linear(self.post_attn_norm(x), self.gate_up_weight).chunk(2, dim=-1)
        return x + linear(F.silu(gate) * up, self.down_weight)

    def forward_fused(self, ext, x: torch.Tensor, positions: torch.Tensor, rotary: Rotary,
                      kv: tuple[torch.Tensor, ...], meta: AttentionMetadata) -> torch.Tensor:
        """The same layer through the CPU kernels' fused steps (model/csrc/fused.cpp): one
        call each for the norms, rotary + KV write and silu * up. Updates x in place."""
        t = x.shape[0]
        qkv = linear(ext.rms_norm(x, self.input_norm.weight, self.input_norm.eps, _EMPTY), self.qkv_weight,
                     self.qkv_bias)
        kv_scales = cache_scales(kv)
        q = ext.rope_write_kv(qkv, positions, rotary.cos, rotary.sin, self.num_heads, self.num_kv_heads, kv[0], kv[1],
                              meta.slot_mapping, *(kv_scales or (_EMPTY, _EMPTY)))
        attn = paged_attention(q, kv[0], kv[1], meta, self.scale, kv_scales)
        h = ext.rms_norm(x, self.post_attn_norm.weight, self.post_attn_norm.eps,
                         linear(attn.reshape(t, self.q_size), self.o_weight))  # x += o first
        return x.add_(linear(ext.silu_mul(linear(h, self.gate_up_weight)), self.down_weight))


_EMPTY = torch.empty(0)
DECODE_STACK = True  # tests turn it off to compare with the per-layer path


class LlamaModel(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                 max_positions: int | None = None, quantization: tuple[str, int] = ("none", 0)):
        super().__init__()
        self.cfg = cfg
        self.quantization = quantization
        self.dtype = dtype
        self.device = device
        self.layers = torch.nn.ModuleList(DecoderLayer(cfg, dtype, device) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.rotary = Rotary(cfg, max_positions or cfg.max_position_embeddings, dtype, device)
        self.embed: torch.Tensor
        self.lm_head: torch.Tensor
        self._stack: tuple | bool | None = None  # llama_decode_layers' weight lists; False: not packed
        self._stack_caches: tuple[list, list] | None = None

    @torch.inference_mode()
    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Take HF-named tensors, fuse what can be fused, cast to the model dtype and device."""
        take = weight_taker(weights, self.dtype, self.device)
        self.embed = take("model.embed_tokens.weight")
        has_head = "lm_head.weight" in weights
        self.lm_head = take("lm_head.weight") if has_head and not self.cfg.tie_word_embeddings else self.embed
        self.norm.weight.copy_(take("model.norm.weight"))
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            layer.load_projections(take, p, self.cfg.attention_bias)
            layer.input_norm.weight.copy_(take(p + "input_layernorm.weight"))
            layer.post_attn_norm.weight.copy_(take(p + "post_attention_layernorm.weight"))
        prepare_linears(self, self.quantization)
        self._stack = None

    def weight_bytes(self) -> int:
        return model_weight_bytes(self)

    def _fused_kernels(self, kv_caches: list[tuple[torch.Tensor, ...]]):
        """The CPU kernels when the fused layer path applies here, else None."""
        if (self.device.type != "cpu" or self.dtype not in (torch.float32, torch.bfloat16) or self.cfg.qk_norm
                or not kv_caches or kv_caches[0][0].dtype not in (self.dtype, torch.int8)):
            return None
        return cpu_kernels()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, ...]], meta: AttentionMetadata) -> torch.Tensor:
        x = F.embedding(input_ids, self.embed)
        tap(meta, 0, x)
        ext = self._fused_kernels(kv_caches)
        if ext is None:
            for i, (layer, kv) in enumerate(zip(self.layers, kv_caches)):
                x = layer(x, positions, self.rotary, kv, meta)
                tap(meta, i + 1, x)
            return self.norm(x)
        stack = (self._decode_stack(kv_caches) if not meta.prefills and meta.capture is None and DECODE_STACK
                 else None)
        if stack is not None:  # decodes only: the whole stack in one call, same kernels and roundings
            layer = self.layers[0]
            return ext.llama_decode_layers(x, positions, self.rotary.cos, self.rotary.sin, *stack, meta.slot_mapping,
                                           meta.decode_block_tables, meta.decode_context_lens, layer.num_heads,
                                           layer.num_kv_heads, self.norm.eps, layer.scale, self.norm.weight)
        for i, (layer, kv) in enumerate(zip(self.layers, kv_caches)):
            x = layer.forward_fused(ext, x, positions, self.rotary, kv, meta)
            tap(meta, i + 1, x)
        return ext.rms_norm(x, self.norm.weight, self.norm.eps, _EMPTY)

    def _decode_stack(self, kv_caches: list[tuple[torch.Tensor, ...]]):
        """(norms, caches, linears, sizes) as `llama_decode_layers` (model/csrc/decoder.cpp) takes
        them, or None when some linear is not packed for the CPU kernels."""
        if self._stack is None:
            norms, linears, sizes = [], [], []
            for layer in self.layers:
                norms.append([layer.input_norm.weight, layer.post_attn_norm.weight])
                for w, bias in ((layer.qkv_weight, layer.qkv_bias), (layer.o_weight, None),
                                (layer.gate_up_weight, None), (layer.down_weight, None)):
                    b = _EMPTY if bias is None else bias
                    if isinstance(w, PackedWeight):
                        linears.append([w.packed, w.scales, b, w.dense])
                        sizes.append([w.out_features, 0, w.max_rows])
                    elif isinstance(w, PackedInt4Weight):
                        linears.append([w.codes, w.scales, w.mins, b])
                        sizes.append([w.out_features, w.group_size])
                    else:
                        self._stack = False
                        return None
            self._stack = (norms, linears, sizes)
        if self._stack is False:
            return None
        if self._stack_caches is None or self._stack_caches[0] is not kv_caches:
            self._stack_caches = (kv_caches, [list(kv) if len(kv) == 4 else [kv[0], kv[1], _EMPTY, _EMPTY]
                                              for kv in kv_caches])
        norms, linears, sizes = self._stack
        return norms, self._stack_caches[1], linears, sizes

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.lm_head).float()
