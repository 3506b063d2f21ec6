"""The time of one engine step: a roofline per part of the step.

A step runs `rows` tokens (one per decoding sequence plus the prefill chunks) through the
model. Its time is

    fixed step cost (+ the server's own per-step cost, measured on `local`)
    + cost per sequence in the step + cost per prefill chunk
    + max(weight bytes / bandwidth, linear FLOPs / matmul rate)     the linear layers
    + KV bytes read / bandwidth                                     decode attention
    + prefill attention FLOPs / matmul rate                         prefill attention
    + 2 all-reduces per layer when the model is split over accelerators

where each bandwidth and rate is the hardware's peak times its efficiency factor (a
fraction the catalog assumes, or `tuili plan --calibrate` measures). The linear layers
are memory-bound while the step's rows are few (decode) and compute-bound once a prefill
chunk fills the step; which side of the max wins is the step's `bound`.
"""
from __future__ import annotations

from dataclasses import dataclass

from .hardware import Hardware
from .shapes import ModelShape


@dataclass
class StepModel:
    shape: ModelShape
    hw: Hardware
    quantization: str = "none"
    kv_cache_dtype: str = "auto"
    count: int = 1  # accelerators the model is split over (tensor parallel)

    def __post_init__(self) -> None:
        e = self.hw.eff(self.quantization)
        self.e = e
        n = self.count
        self.bw_w = self.hw.bandwidth * e["weight_bw"] * n
        self.bw_kv = self.hw.bandwidth * e["kv_bw"] * n
        self.rate = self.hw.matmul_rate(self.quantization) * e["matmul"] * n
        self.rate16 = self.hw.bf16_flops * e["matmul"] * n  # attention runs in 16 bits
        self.kv_token = self.shape.kv_bytes_per_token(self.kv_cache_dtype)
        q4 = self.hw.int4_bytes_per_param
        self._dense_read = None if self.shape.num_experts else self.shape.read_bytes_per_step(1, self.quantization, q4)
        self.flops_per_row = 2 * self.shape.active_linear_params
        self.flops_per_sample = 2 * self.shape.head_params

    def weight_read(self, rows: int) -> float:
        if self._dense_read is not None:
            return self._dense_read
        return self.shape.read_bytes_per_step(rows, self.quantization, self.hw.int4_bytes_per_param)

    def parts(self, n_dec: int, dec_context: float, chunks: list[tuple[int, int]], n_sampled: int) -> tuple[float, float, float]:
        """(time of everything but the linears' roofline, weight time, linear compute time)."""
        rows = n_dec + sum(c for c, _ in chunks)
        t_mem = self.weight_read(rows) / self.bw_w
        t_cmp = (self.flops_per_row * rows + self.flops_per_sample * n_sampled) / self.rate
        kv = self.shape.kv_read_bytes(dec_context / n_dec, self.kv_cache_dtype) * n_dec if n_dec else 0.0
        attn_flops = 0.0
        for tokens, start in chunks:
            kv += self.shape.kv_read_bytes(start, self.kv_cache_dtype) if start else 0.0
            attn_flops += self.shape.attention_flops(tokens, start)
        other = (self.e["step_overhead_s"] + self.e["seq_overhead_s"] * (n_dec + len(chunks))
                 + self.e.get("chunk_overhead_s", 0.0) * len(chunks) + self.e.get("serve_step_overhead_s", 0.0)
                 + kv / self.bw_kv + attn_flops / self.rate16 + self.allreduce(rows))
        return other, t_mem, t_cmp

    def step_time(self, n_dec: int, dec_context: float, chunks: list[tuple[int, int]], n_sampled: int) -> float:
        other, t_mem, t_cmp = self.parts(n_dec, dec_context, chunks, n_sampled)
        return other + max(t_mem, t_cmp)

    def bound(self, n_dec: int, dec_context: float, chunks: list[tuple[int, int]], n_sampled: int) -> str:
        other, t_mem, t_cmp = self.parts(n_dec, dec_context, chunks, n_sampled)
        kv = self.shape.kv_read_bytes(dec_context / n_dec, self.kv_cache_dtype) * n_dec / self.bw_kv if n_dec else 0.0
        return "compute" if t_cmp > t_mem + kv else "memory"

    def allreduce(self, rows: int) -> float:
        n = self.count
        if n <= 1:
            return 0.0
        link = self.hw.interconnect or self.hw.bandwidth
        size = rows * self.shape.hidden_size * 2 * 2 * (n - 1) / n  # ring all-reduce of 16-bit activations
        return 2 * self.shape.num_layers * (self.e["allreduce_latency_s"] + size / link)

    # --- per-phase summaries ----------------------------------------------------------
    def decode_step(self, batch: int, context: float) -> float:
        return self.step_time(batch, batch * context, [], batch)

    def prefill_time(self, prompt: int) -> float:
        """One prompt alone, chunked by the step budget."""
        budget, t, done = self.hw.step_token_budget, 0.0, 0
        while done < prompt:
            n = min(budget, prompt - done)
            t += self.step_time(0, 0.0, [(n, done)], 1 if done + n == prompt else 0)
            done += n
        return t
