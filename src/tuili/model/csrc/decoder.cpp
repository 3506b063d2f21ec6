// All decoder layers of a Llama-family model for a decode-only step, in one call (CPU).
//
// At batch 1 a step of a 30-layer model makes about 270 kernel calls; from Python each
// costs its argument parsing, a GIL release and a few small tensor ops around it, about
// a sixth of the step on this kind of CPU. This walks the same kernels, in the same order
// and with the same roundings, from C++: the result is bit-identical to the per-layer
// path of `DecoderLayer.forward_fused`, and the GIL is let go once for the whole stack.
#include "kernels.h"

namespace {

// A packed linear as Python hands it over: group 0 -> (packed, scales, bias, dense) of
// gemm.cpp's packed_linear, where a non-empty dense (the plain bf16 weight) takes batches of
// more than max_rows rows through torch's matmul, as PackedWeight.matmul does; group > 0 ->
// (codes, scales, mins, bias) of packed_linear_q4.
torch::Tensor linear(const torch::Tensor& x, const std::vector<torch::Tensor>& w, int64_t n, int64_t group,
                     int64_t max_rows) {
  if (group == 0) {
    TORCH_CHECK(w.size() == 4, "decode_layers: a packed linear is (packed, scales, bias, dense)");
    if (w[3].numel() && x.size(0) > max_rows)
      return w[2].numel() ? at::linear(x, w[3], w[2]) : at::linear(x, w[3]);
    return packed_linear(x, w[0], n, w[1], w[2], false);
  }
  TORCH_CHECK(w.size() == 4, "decode_layers: an int4 linear is (codes, scales, mins, bias)");
  return packed_linear_q4(x, w[0], w[1], w[2], n, group, w[3], false);
}

}  // namespace

// x [T, hidden] (the embeddings; updated in place) -> final-normed hidden states [T, hidden].
// Per layer l: norms[l] = (input norm, post-attention norm); caches[l] = (k, v, k_scales,
// v_scales), scales empty unless the cache is int8; linears[4 l + i] with sizes[4 l + i] =
// (out features, int4 group or 0[, max rows of the packed product]) for i = qkv, o, gate_up, down.
torch::Tensor llama_decode_layers(torch::Tensor x, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin,
                                  std::vector<std::vector<torch::Tensor>> norms,
                                  std::vector<std::vector<torch::Tensor>> caches,
                                  std::vector<std::vector<torch::Tensor>> linears,
                                  std::vector<std::vector<int64_t>> sizes, torch::Tensor slots, torch::Tensor tables,
                                  torch::Tensor lens, int64_t heads, int64_t kv_heads, double eps, double scale,
                                  torch::Tensor final_norm) {
  const size_t layers = norms.size();
  TORCH_CHECK(caches.size() == layers && linears.size() == 4 * layers && sizes.size() == 4 * layers,
              "decode_layers: one set of norms, caches and four linears per layer");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "decode_layers: x must be [T, hidden] contiguous");
  const int64_t t = x.size(0);
  auto lin = [&](const torch::Tensor& in, size_t i) {
    return linear(in, linears[i], sizes[i][0], sizes[i][1], sizes[i].size() > 2 ? sizes[i][2] : 0);
  };
  for (size_t l = 0; l < layers; ++l) {
    const auto& kv = caches[l];
    TORCH_CHECK(norms[l].size() == 2 && kv.size() == 4, "decode_layers: norms (2) and caches (4) per layer");
    auto h = rms_norm(x, norms[l][0], eps, torch::empty({0}, x.options()));
    auto q = rope_write_kv(lin(h, 4 * l), positions, cos, sin, heads, kv_heads, kv[0], kv[1], slots, kv[2], kv[3]);
    auto attn = paged_decode_attention(q, kv[0], kv[1], tables, lens, scale, kv[2], kv[3], 0).to(x.scalar_type());
    h = rms_norm(x, norms[l][1], eps, lin(attn.reshape({t, -1}), 4 * l + 1));  // x += o first
    x.add_(lin(silu_mul(lin(h, 4 * l + 2)), 4 * l + 3));
  }
  return rms_norm(x, final_norm, eps, torch::empty({0}, x.options()));
}
