"""Building blocks every model here shares: linear layers over any weight form, RMSNorm,
rotary embeddings, and the attention block over the paged cache (`AttentionLayer`).

The numerics follow Hugging Face transformers step by step (RMSNorm in float32 then cast,
rotate-half rotary, softmax in float32) so greedy decoding matches it token for token.

The KV cache layout is fixed by the design: per layer, K and V are each
`[num_blocks, block_size, num_kv_heads, head_dim]`. Attention here only needs the
flattened slot index of each new token (`slot_mapping`) and, per sequence, its block
table and context length; scheduling is not its business.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..device import cpu_bf16_is_slow
from .kernels import cpu_kernels
from .quant import PACKED_TYPES, QuantWeight

# A CPU without native bfloat16 (no AVX512-BF16/AMX) emulates bf16 matmuls at a fraction of
# float32 speed once there are more than a few rows, while for a handful of rows (decode)
# the bf16 matmul is the faster one because it reads half the bytes. Measured on an
# AVX2-only EPYC, 20 matrices of 3072x576: bf16 vs float32-upcast 7 vs 52 ms at 1 row,
# 79 vs 62 ms at 16 rows, 289 vs 103 ms at 64 rows. So above this many rows such CPUs
# run the matmul in float32 and cast back; weights stay bf16 in memory.
# Whether this CPU is such a one is asked at call time (`tuili.device.cpu_bf16_is_slow`,
# probed once per process), not when this module is imported.
BF16_UPCAST_MIN_ROWS = 8


def linear(x: torch.Tensor, weight: torch.Tensor | QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(weight, PACKED_TYPES):  # bf16 / int8 / int4 packed for the CPU kernel
        return weight.matmul(x, bias=bias)
    if not isinstance(weight, torch.Tensor):  # int8 / int4 weight-only (model/quant.py)
        out = weight.matmul(x, cpu_bf16_is_slow(x.device))
        return out if bias is None else out + bias
    if x.dtype is torch.bfloat16 and x.shape[0] > BF16_UPCAST_MIN_ROWS and cpu_bf16_is_slow(x.device):
        out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
        return out.to(torch.bfloat16)
    return F.linear(x, weight, bias)


def weight_taker(weights: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device) -> Callable[[str], torch.Tensor]:
    """`take(name)`: the HF-named tensor, cast to the model's dtype and device; a missing one
    is a ValueError naming it."""
    def take(name: str) -> torch.Tensor:
        if name not in weights:
            raise ValueError(f"weights are missing tensor {name!r}")
        return weights[name].to(device=device, dtype=dtype).contiguous()

    return take


class RMSNorm(torch.nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device, init: float = 1.0):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((dim,), init, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """x / rms(x) in float32."""
        h = x.float()
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * self.normalize(x).to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the attention scaling factor, for the rope types we support."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        factor = scaling["factor"]
        low = scaling.get("low_freq_factor", 1.0)
        high = scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling["original_max_position_embeddings"]
        low_wavelen = old_ctx / low
        high_wavelen = old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled), 1.0
    raise ValueError(f"unsupported rope scaling type {kind!r}")


class Rotary(torch.nn.Module):
    """Precomputed cos/sin tables indexed by absolute position (rotate-half convention)."""

    def __init__(self, cfg: ModelConfig, max_positions: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        inv_freq, attn_scale = rope_inv_freq(cfg)
        pos = torch.arange(max_positions, dtype=torch.float32)
        freqs = pos[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", (emb.cos() * attn_scale).to(dtype=dtype, device=device), persistent=False)
        self.register_buffer("sin", (emb.sin() * attn_scale).to(dtype=dtype, device=device), persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        """q: [T, H, D], k: [T, KVH, D], positions: [T]."""
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class AttentionLayer(torch.nn.Module):
    """The attention half of a decoder layer, shared by every model family here: fused q/k/v
    projection, optional per-head q/k norm, rotary, the KV cache write, paged attention and
    the output projection. A model's layer class derives from it and adds its own norms and
    MLP; the four projection weights (filled by `load_projections`) live on the layer so
    that quantization and packing (`quant.prepare_linears`) treat every family alike."""

    def __init__(self, cfg: ModelConfig, scale: float, window: int | None = None,
                 qk_norm: Callable[[int], torch.nn.Module] | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = scale
        self.window = window  # sliding-window layers: how many past positions a query sees
        self.q_norm = qk_norm(cfg.head_dim) if qk_norm else None
        self.k_norm = qk_norm(cfg.head_dim) if qk_norm else None
        self.qkv_weight: torch.Tensor | QuantWeight
        self.qkv_bias: torch.Tensor | None = None
        self.o_weight: torch.Tensor | QuantWeight
        self.gate_up_weight: torch.Tensor | QuantWeight
        self.down_weight: torch.Tensor | QuantWeight

    def load_projections(self, take: Callable[[str], torch.Tensor], prefix: str, attention_bias: bool) -> None:
        """Set the projections from HF-named tensors under `prefix`, fused: q/k/v into
        `qkv_weight` (and `qkv_bias`), gate/up into `gate_up_weight`."""
        a = prefix + "self_attn."
        self.qkv_weight = torch.cat([take(a + "q_proj.weight"), take(a + "k_proj.weight"),
                                     take(a + "v_proj.weight")]).contiguous()
        if attention_bias:
            self.qkv_bias = torch.cat([take(a + "q_proj.bias"), take(a + "k_proj.bias"),
                                       take(a + "v_proj.bias")]).contiguous()
        self.o_weight = take(a + "o_proj.weight")
        self.gate_up_weight = torch.cat([take(prefix + "mlp.gate_proj.weight"),
                                         take(prefix + "mlp.up_proj.weight")]).contiguous()
        self.down_weight = take(prefix + "mlp.down_proj.weight")
        if self.q_norm is not None:
            self.q_norm.weight.copy_(take(a + "q_norm.weight"))
            self.k_norm.weight.copy_(take(a + "k_norm.weight"))

    def attention(self, h: torch.Tensor, positions: torch.Tensor, rotary: "Rotary",
                  kv: tuple[torch.Tensor, ...], meta: "AttentionMetadata") -> torch.Tensor:
        """o_proj(attention(h)) for the step's normed hidden states h [T, hidden]; writes the
        step's K/V into the layer's cache `kv` first."""
        t = h.shape[0]
        q, k, v = linear(h, self.qkv_weight, self.qkv_bias).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(q, k, positions)
        kv_scales = cache_scales(kv)
        write_kv(kv[0], kv[1], k, v, meta.slot_mapping, kv_scales)
        attn = paged_attention(q, kv[0], kv[1], meta, self.scale, kv_scales, self.window)
        return linear(attn.reshape(t, self.q_size), self.o_weight)


@dataclass
class PrefillSpan:
    """One sequence's chunk in the step: its queries are tokens [q_start, q_start+q_len) of the
    flattened batch; after this step the sequence has `ctx_len` tokens in the cache."""

    q_start: int
    q_len: int
    ctx_len: int
    block_table: torch.Tensor  # [num_blocks_of_seq] long


@dataclass
class AttentionMetadata:
    """What attention needs for one step. Decode tokens come first in the batch, one per sequence."""

    slot_mapping: torch.Tensor  # [T] long: flat cache slot for each new token
    num_decodes: int = 0
    decode_block_tables: torch.Tensor | None = None  # [B, max_blocks] long (padded with 0)
    decode_context_lens: torch.Tensor | None = None  # [B] long
    decode_max_context: int = 0
    prefills: list[PrefillSpan] = field(default_factory=list)
    # depth -> the residual stream after that many layers (0: the embeddings), for the rows of
    # this step; the runner asks for it (SamplingParams.hidden_layer), the model fills it in
    capture: dict[int, torch.Tensor | None] | None = None


def tap(meta: AttentionMetadata, depth: int, x: torch.Tensor) -> None:
    """Keep a copy of the residual stream after `depth` layers when the step asked for it."""
    if meta.capture is not None and depth in meta.capture:
        meta.capture[depth] = x.detach().clone()


KVScales = tuple[torch.Tensor, torch.Tensor]  # int8 cache: float32 [num_blocks, block_size, KVH] for K and V


def cache_scales(kv: tuple[torch.Tensor, ...]) -> KVScales | None:
    """A layer's cache is (K, V), or (K, V, K scales, V scales) when it holds int8."""
    return (kv[2], kv[3]) if len(kv) == 4 else None


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per token and head: x [T, KVH, D] -> codes int8 and scales float32 [T, KVH]."""
    x32 = x.float()
    scale = (x32.abs().amax(dim=-1) / 127.0).clamp(min=1e-8)
    return torch.round(x32 / scale[..., None]).clamp(-127, 127).to(torch.int8), scale


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor, kv_scales: KVScales | None = None) -> None:
    """Store the step's new K/V rows at their slots (the cache viewed as [slots, KVH, D])."""
    kvh, d = k_cache.shape[-2:]
    if kv_scales is not None:
        (kq, ks), (vq, vs) = quantize_kv(k), quantize_kv(v)
        k_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, kq)
        v_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, vq)
        kv_scales[0].view(-1, kvh).index_copy_(0, slot_mapping, ks)
        kv_scales[1].view(-1, kvh).index_copy_(0, slot_mapping, vs)
        return
    k_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, kv_scales: KVScales | None = None,
                    window: int | None = None) -> torch.Tensor:
    """Attention of the step's queries q [T, H, D] over each sequence's cached context.

    The new K/V of the step must already be written to the cache (an int8 cache is read
    back dequantized, so a chunk's own keys are seen as later steps will see them). On
    CPUs with slow bfloat16 the attention arithmetic runs in float32 (K/V are upcast as
    they are gathered). `window` (sliding-window layers): a query at position p sees only
    positions p - window + 1 .. p, as in transformers' sliding-window mask."""
    dtype = q.dtype
    if q.dtype is torch.bfloat16 and cpu_bf16_is_slow(q.device):
        q = q.float()
    if not meta.prefills:  # decodes only: no output buffer to assemble
        return _decode_attention(q, k_cache, v_cache, meta, scale, kv_scales, window).to(dtype)
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    if meta.num_decodes:
        out[: meta.num_decodes] = _decode_attention(q[: meta.num_decodes], k_cache, v_cache, meta, scale, kv_scales,
                                                     window)
    for span in meta.prefills:
        q_seq = q[span.q_start: span.q_start + span.q_len]
        out[span.q_start: span.q_start + span.q_len] = _prefill_attention(q_seq, k_cache, v_cache, span, scale,
                                                                          kv_scales, window)
    return out


def _gather(cache: torch.Tensor, block_table: torch.Tensor, ctx_len: int, dtype: torch.dtype,
            scales: torch.Tensor | None) -> torch.Tensor:
    """One sequence's first ctx_len rows [ctx_len, KVH, D], dequantized to dtype."""
    kvh, d = cache.shape[-2:]
    rows = cache.index_select(0, block_table).view(-1, kvh, d)[:ctx_len]
    if scales is None:
        return rows.to(dtype)
    s = scales.index_select(0, block_table).view(-1, kvh)[:ctx_len]
    return (rows.float() * s[..., None]).to(dtype)


def _amx_prefill_kernels(q: torch.Tensor, k_cache: torch.Tensor, kv_scales: KVScales | None):
    """The CPU kernels when a chunk's attention can run on their AMX tiles (bf16 queries on a
    bf16 cache, head dims a multiple of 32, a CPU with AMX-BF16 and TUILI_AMX not 0), else None."""
    if q.dtype is not torch.bfloat16 or k_cache.dtype is not torch.bfloat16 or kv_scales is not None:
        return None
    if q.device.type != "cpu" or q.shape[-1] % 32:
        return None
    ext = cpu_kernels()
    return ext if ext is not None and ext.prefill_attention_available() else None


def _f32_prefill_kernels(q: torch.Tensor, k_cache: torch.Tensor, kv_scales: KVScales | None):
    """The CPU kernels when a chunk's attention can run on their AVX2 float32 loop (float32
    queries, as on CPUs with slow bf16, or bf16 ones widened where AMX does not take them; on a
    bf16 or float32 cache; head dims a multiple of 16), else None. On the AVX512-BF16 EPYC
    without AMX it ran a 245-token chunk 2.3x faster than torch's bf16 attention, and a row's
    result does not depend on where its chunk starts (torch's does: docs/BENCHMARKS.md)."""
    if (q.dtype not in (torch.float32, torch.bfloat16) or k_cache.dtype not in (torch.bfloat16, torch.float32)
            or kv_scales is not None or q.device.type != "cpu" or q.shape[-1] % 16):
        return None
    ext = cpu_kernels()
    return ext if ext is not None and ext.prefill_attention_f32_available() else None


def attention_paths(dtype: torch.dtype, kv_dtype: torch.dtype, device: torch.device, head_dim: int) -> str:
    """Which attention code a model of `dtype` with a `kv_dtype` cache runs here (start-up log)."""
    q = torch.empty(1, 1, head_dim, dtype=dtype, device=device)
    if q.dtype is torch.bfloat16 and cpu_bf16_is_slow(device):
        q = q.float()
    cache = torch.empty(1, 1, 1, head_dim, dtype=kv_dtype, device=device)
    scales = (torch.empty(1), torch.empty(1)) if kv_dtype is torch.int8 else None
    decode = "compiled kernel" if device.type == "cpu" and cpu_kernels() is not None else "PyTorch"
    prefill = ("AMX tiles" if _amx_prefill_kernels(q, cache, scales) is not None else
               "AVX2 float32 kernel" if _f32_prefill_kernels(q, cache, scales) is not None else "PyTorch")
    return f"attention: decode {decode}, prefill {prefill} ({str(q.dtype).removeprefix('torch.')} queries)"


def _prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       span: PrefillSpan, scale: float, kv_scales: KVScales | None,
                       window: int | None = None) -> torch.Tensor:
    ext = _amx_prefill_kernels(q, k_cache, kv_scales)
    if ext is not None:  # bf16 on AMX tiles, K/V read out of the blocks in place (model/csrc/prefill_attention.cpp)
        return ext.paged_prefill_attention(q, k_cache, v_cache, span.block_table, span.ctx_len, scale, window or 0)
    ext = _f32_prefill_kernels(q, k_cache, kv_scales)
    if ext is not None:  # float32 on the AVX2 matmul's tiles (model/csrc/prefill_attention_avx2.cpp)
        return ext.paged_prefill_attention_f32(q.float(), k_cache, v_cache, span.block_table, span.ctx_len, scale,
                                               window or 0).to(q.dtype)
    ks, vs = kv_scales if kv_scales is not None else (None, None)
    k = _gather(k_cache, span.block_table, span.ctx_len, q.dtype, ks)
    v = _gather(v_cache, span.block_table, span.ctx_len, q.dtype, vs)
    # [1, heads, len, D]: with a batch dim torch takes its flash kernel on CPU (GQA included);
    # 3-D inputs fall to the math path, 7x slower on a 250-token chunk here.
    qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    past = span.ctx_len - span.q_len
    windowed = window is not None and span.ctx_len > window
    if past == 0 and not windowed:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
    else:
        rows = torch.arange(span.q_len, device=q.device)[:, None] + past
        cols = torch.arange(span.ctx_len, device=q.device)[None, :]
        mask = (cols <= rows) & (cols > rows - window) if windowed else cols <= rows
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
    return o[0].transpose(0, 1)


_NO_SCALES = torch.empty(0)


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttentionMetadata, scale: float, kv_scales: KVScales | None,
                      window: int | None = None) -> torch.Tensor:
    """One query per sequence. On CPU the compiled kernel reads the blocks in place; otherwise
    K/V are gathered into a padded [B, L] batch and masked by length."""
    kernel_dtypes = (torch.float32, torch.bfloat16, torch.int8)
    ext = cpu_kernels() if q.device.type == "cpu" and k_cache.dtype in kernel_dtypes else None
    if ext is not None:
        ks, vs = kv_scales if kv_scales is not None else (_NO_SCALES, _NO_SCALES)
        # bf16 queries stay bf16: with a bf16 cache the kernel then multiplies them as such
        out = ext.paged_decode_attention(q.contiguous(), k_cache, v_cache, meta.decode_block_tables,
                                         meta.decode_context_lens, scale, ks, vs, window or 0)
        return out.to(q.dtype)
    return decode_attention_torch(q, k_cache, v_cache, meta, scale, kv_scales, window)


def decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           meta: AttentionMetadata, scale: float, kv_scales: KVScales | None = None,
                           window: int | None = None) -> torch.Tensor:
    b, h, d = q.shape
    kvh = k_cache.shape[-2]
    tables = meta.decode_block_tables.flatten()
    max_len = meta.decode_max_context

    def batch(cache: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
        rows = cache.index_select(0, tables).view(b, -1, kvh, d)[:, :max_len]
        if scales is not None:
            rows = rows.float() * scales.index_select(0, tables).view(b, -1, kvh, 1)[:, :max_len]
        return rows.transpose(1, 2).to(q.dtype)

    ks, vs = kv_scales if kv_scales is not None else (None, None)
    k, v = batch(k_cache, ks), batch(v_cache, vs)
    pos = torch.arange(max_len, device=q.device)[None, :]
    valid = pos < meta.decode_context_lens[:, None]
    if window is not None:
        valid &= pos >= meta.decode_context_lens[:, None] - window
    o = F.scaled_dot_product_attention(q.view(b, h, 1, d), k, v, attn_mask=valid[:, None, None, :],
                                       scale=scale, enable_gqa=True)
    return o.view(b, h, d)
