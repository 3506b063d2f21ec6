// The CPU kernels' entry points, shared by the bindings and by decoder.cpp.
#pragma once
#include <torch/extension.h>

#include <vector>

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor tables, torch::Tensor lens, double scale,
                                     torch::Tensor k_scales, torch::Tensor v_scales, int64_t window);
bool prefill_attention_available();
torch::Tensor paged_prefill_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                      torch::Tensor table, int64_t ctx_len, double scale, int64_t window);
bool prefill_attention_f32_available();
torch::Tensor paged_prefill_attention_f32(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                          torch::Tensor table, int64_t ctx_len, double scale, int64_t window);
bool gemm_available();
bool gemm_bf16_pairs();
bool gemm_amx_available();
void set_bf16_widen_rows(int64_t rows);
int64_t bf16_widen_rows();
bool gemm_amx_int8_available();
void set_int8_amx_rows(int64_t rows);
int64_t int8_amx_rows();
torch::Tensor pack_weight(torch::Tensor w);
torch::Tensor packed_linear(torch::Tensor x, torch::Tensor packed, int64_t N, torch::Tensor scales,
                            torch::Tensor bias, bool out_float);
torch::Tensor packed_linear_q4(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor mins,
                               int64_t N, int64_t group, torch::Tensor bias, bool out_float);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps, torch::Tensor delta);
torch::Tensor rope_write_kv(torch::Tensor qkv, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin,
                            int64_t heads, int64_t kv_heads, torch::Tensor k_cache, torch::Tensor v_cache,
                            torch::Tensor slots, torch::Tensor k_scales, torch::Tensor v_scales);
torch::Tensor silu_mul(torch::Tensor gate_up);
torch::Tensor argmax_rows(torch::Tensor x);
torch::Tensor llama_decode_layers(torch::Tensor x, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin,
                                  std::vector<std::vector<torch::Tensor>> norms,
                                  std::vector<std::vector<torch::Tensor>> caches,
                                  std::vector<std::vector<torch::Tensor>> linears,
                                  std::vector<std::vector<int64_t>> sizes, torch::Tensor slots, torch::Tensor tables,
                                  torch::Tensor lens, int64_t heads, int64_t kv_heads, double eps, double scale,
                                  torch::Tensor final_norm);
