// Schemas of the deepseek_moe extension ops (namespace deepseek_moe, shared with the Python custom ops of
// deepseek_moe/backends). Kernels are registered per device in cpu/*.cpp and cuda/*.cpp; autograd and fake
// (meta) implementations are registered from Python (deepseek_moe/backends/ext.py).
//
// Legend: T tokens, K slots per token, E experts, N sorted pairs, H hidden size, I expert hidden size.

#include <torch/library.h>

#include "cpu/host_cache.h"

TORCH_LIBRARY(deepseek_moe, m) {
  // topk_idx (T, K) -> counts (E,), offsets (E+1,), pair (N,), token (N,), slot (T, K); stable counting sort.
  m.def("route_plan(Tensor topk_idx, int num_experts) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // x (T, H), token (N,) -> x (N, H). slot (T, K) is not read here: it carries what the backward (the
  // unweighted combine) needs, so autograd can be registered on the op itself.
  m.def("permute(Tensor x, Tensor token, Tensor slot) -> Tensor");
  // o (N, H), slot (T, K), weight (T, K)? -> y (T, H) = sum_k w * o[slot], fp32 accumulation.
  m.def("combine(Tensor o, Tensor slot, Tensor? weight) -> Tensor");
  // -> grad_o (N, H), grad_weight (T, K) (undefined without weight).
  m.def("combine_backward(Tensor grad_y, Tensor o, Tensor slot, Tensor? weight) -> (Tensor, Tensor)");
  // The routed-experts MLP over expert segments, writing the saved gate/up pre-activations into h_out.
  m.def("segment_mlp_fused(Tensor x, Tensor gate_up, Tensor down, Tensor token, Tensor weight, Tensor counts, "
        "Tensor(a!) h_out) -> Tensor");
  m.def("segment_mlp_fused_backward(Tensor grad_y, Tensor x, Tensor gate_up, Tensor down, Tensor token, "
        "Tensor weight, Tensor counts, Tensor h, Tensor(a!) grad_gate_up_out, Tensor(b!) grad_down_out) "
        "-> (Tensor, Tensor)");
  // The host block cache behind the CPU ops' large outputs (cpu/host_cache.h); device-independent.
  m.def("host_cache_info() -> int[]", &deepseek_moe::host_cache_info);
  m.def("host_cache_empty() -> ()", &deepseek_moe::host_cache_empty);
  m.def("host_cache_set_limit(int bytes) -> ()", &deepseek_moe::host_cache_set_limit);
}
