// Python bindings of the CPU kernels (one module for all sources).
#include <torch/extension.h>

#include "kernels.h"

// The kernels touch no Python objects, so they let go of the GIL: while the engine thread
// computes a step, the server's event loop thread can stream tokens and take requests.
static const auto kNoGil = py::call_guard<py::gil_scoped_release>();

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV cache (CPU)", kNoGil,
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("tables"), py::arg("lens"), py::arg("scale"),
        py::arg("k_scales"), py::arg("v_scales"), py::arg("window") = 0);
  m.def("prefill_attention_available", &prefill_attention_available,
        "whether paged_prefill_attention runs here (AMX-BF16, TUILI_AMX not 0)", kNoGil);
  m.def("paged_prefill_attention", &paged_prefill_attention,
        "causal attention of one sequence's chunk over its paged bf16 cache, on AMX tiles (CPU)", kNoGil,
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("table"), py::arg("ctx_len"), py::arg("scale"),
        py::arg("window") = 0);
  m.def("prefill_attention_f32_available", &prefill_attention_f32_available,
        "whether paged_prefill_attention_f32 runs here (AVX2)", kNoGil);
  m.def("paged_prefill_attention_f32", &paged_prefill_attention_f32,
        "causal attention of one sequence's chunk over its paged bf16 or float32 cache, in float32 (CPU)", kNoGil,
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("table"), py::arg("ctx_len"), py::arg("scale"),
        py::arg("window") = 0);
  m.def("gemm_available", &gemm_available, "whether packed_linear was built (AVX2)", kNoGil);
  m.def("gemm_bf16_pairs", &gemm_bf16_pairs, "whether bf16 products take bf16 activations (AVX512-BF16)", kNoGil);
  m.def("gemm_amx_available", &gemm_amx_available, "whether bf16 products can run on AMX tiles", kNoGil);
  m.def("set_bf16_widen_rows", &set_bf16_widen_rows,
        "bf16 products of at least this many rows widen to float32 FMAs instead of vdpbf16ps", py::arg("rows"));
  m.def("bf16_widen_rows", &bf16_widen_rows, "the row count from which bf16 products widen to float32");
  m.def("gemm_amx_int8_available", &gemm_amx_int8_available, "whether int8 products can run on AMX tiles", kNoGil);
  m.def("set_int8_amx_rows", &set_int8_amx_rows, "int8 products of at least this many rows run on AMX tiles",
        py::arg("rows"));
  m.def("int8_amx_rows", &int8_amx_rows, "the row count from which int8 products run on AMX tiles");
  m.def("pack_weight", &pack_weight, "repack a [N, K] weight into panels of 16 output columns", kNoGil);
  m.def("packed_linear", &packed_linear, "x @ w.T from a packed bf16/int8/fp32 weight (CPU)", kNoGil,
        py::arg("x"), py::arg("packed"), py::arg("n"), py::arg("scales"), py::arg("bias"), py::arg("out_float"));
  m.def("packed_linear_q4", &packed_linear_q4, "x @ w.T from packed int4 codes with group scales and mins (CPU)", kNoGil,
        py::arg("x"), py::arg("codes"), py::arg("scales"), py::arg("mins"), py::arg("n"), py::arg("group"),
        py::arg("bias"), py::arg("out_float"));
  m.def("rms_norm", &rms_norm, "RMSNorm of rows, after an optional in-place residual add", kNoGil, py::arg("x"),
        py::arg("w"), py::arg("eps"), py::arg("delta"));
  m.def("rope_write_kv", &rope_write_kv, "rotary embedding of q and k, and the KV cache write, in one pass", kNoGil);
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused gate/up projection", kNoGil);
  m.def("argmax_rows", &argmax_rows, "each row's first maximal index, NaN as the largest (greedy sampling)", kNoGil);
  m.def("llama_decode_layers", &llama_decode_layers, "all Llama decoder layers of a decode-only step (CPU)", kNoGil);
}
