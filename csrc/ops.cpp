// Schemas of the deepseek_moe extension ops (namespace deepseek_moe, shared with the Python custom ops of
// deepseek_moe/backends). Kernels are registered per device in cpu/*.cpp and cuda/*.cpp; autograd and fake
// (meta) implementations are registered from Python (deepseek_moe/backends/ext.py).
//
// Legend: T tokens, K slots per token, E experts, N sorted pairs, H hidden size, I expert hidden size.

#include <torch/library.h>

#include "cpu/shared_cpu.h"

TORCH_LIBRARY(deepseek_moe, m) {
  // topk_idx (T, K) -> counts (E,), offsets (E+1,), pair (N,), token (N,), slot (T, K); stable counting sort.
  m.def("route_plan(Tensor topk_idx, int num_experts) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // o (N, H), slot (T, K), weight (T, K)? -> y (T, H) = sum_k w * o[slot], fp32 accumulation.
  m.def("combine(Tensor o, Tensor slot, Tensor? weight) -> Tensor");
  // -> grad_o (N, H), grad_weight (T, K) (undefined without weight).
  m.def("combine_backward(Tensor grad_y, Tensor o, Tensor slot, Tensor? weight) -> (Tensor, Tensor)");
  // The SwiGLU routed experts over expert segments, y = Σ w · expert(x[token]), the SwiGLU clamped at limit when
  // given (swiglu_limit) -> (y (T, H), h (N, 2I): the unclamped gate/up pre-activations, saved for the backward).
  m.def("segment_mlp_fused(Tensor x, Tensor gate_up, Tensor down, Tensor token, Tensor weight, Tensor counts, "
        "float? limit) -> (Tensor, Tensor)");
  // The same routed experts for a few tokens (decode, inference): every chosen expert's rows streamed once, and
  // the shared experts' (gate (Is, H), up (Is, H), down (H, Is)) in the same pass when given -> y (T, H).
  m.def("expert_gemv(Tensor x, Tensor gate_up, Tensor down, Tensor token, Tensor weight, Tensor counts, "
        "float? limit, Tensor? shared_gate=None, Tensor? shared_up=None, Tensor? shared_down=None) -> Tensor");
  // The same for many tokens (prefill, inference, fp32 or bf16): sorted blocks through brgemm -> y (T, H).
  m.def("expert_blocks(Tensor x, Tensor gate_up, Tensor down, Tensor token, Tensor weight, Tensor counts, "
        "float? limit, Tensor? shared_gate=None, Tensor? shared_up=None, Tensor? shared_down=None) -> Tensor");
  // The router's gate GEMM for a decode step: x (T, H) fp32, bf16 or fp16, weight (E, H) fp32 -> logits (T, E) fp32,
  // each logit one fixed-order dot product: the same bits on any number of threads and for a token in any batch.
  m.def("router_logits(Tensor x, Tensor weight) -> Tensor");
  // The router's choice after its gate GEMM, for inference: logits (T, E) fp32, bias (E,) fp32 -> scores (T, E),
  // experts (T, K) int64 best first, gate weights (T, K); score_func 0 softmax, 1 sigmoid, 2 sqrt-softplus;
  // group_score 0 max, 1 top-2 sum.
  m.def("route_topk(Tensor logits, Tensor bias, int score_func, int top_k, int num_groups, int topk_groups, "
        "int group_score, bool norm, float scale) -> (Tensor, Tensor, Tensor)");
  // A layer's routed step for inference in one call: logits = x·router_weightᵀ in fp32 (router_logits for a
  // decode step, ATen's linear for blocks: the gate GEMM the Python router calls under each), route_topk's choice,
  // route_plan, then expert_blocks (blocks) or expert_gemv (otherwise) with the shared experts when given.
  // x (..., H), its T = numel / H rows the tokens -> y (x's shape), logits (T, E), scores (T, E), experts (T, K),
  // gate weights (T, K), counts (E,).
  m.def("fused_moe(Tensor x, Tensor router_weight, Tensor bias, int score_func, int top_k, int num_groups, "
        "int topk_groups, int group_score, bool norm, float scale, Tensor gate_up, Tensor down, float? limit, "
        "bool blocks, Tensor? shared_gate=None, Tensor? shared_up=None, Tensor? shared_down=None) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // -> grad_x (T, H), grad_gate_up (E, 2I, H), grad_down (E, H, I), grad_weight (N,).
  m.def("segment_mlp_fused_backward(Tensor grad_y, Tensor x, Tensor gate_up, Tensor down, Tensor token, "
        "Tensor weight, Tensor counts, Tensor h, float? limit) -> (Tensor, Tensor, Tensor, Tensor)");
  // The decode op's watch over a shared CPU (cpu/shared_cpu.h): enable switches it (None asks) -> whether it is on.
  m.def("shared_cpu_watch(bool? enable=None) -> bool", &deepseek_moe::shared_cpu_watch);
  // Its policy replayed on a fresh watch, for tests: calls starting at start_ns (ns), each taking elapsed_ns for
  // work (any unit) and, where it ran on threads, losing lost_ns of it (waiting for the other threads or kept off
  // the CPU) -> whether each ran on the calling thread alone.
  m.def("_shared_cpu_policy(int[] start_ns, int[] lost_ns, int[] elapsed_ns, int[] work) -> bool[]",
        &deepseek_moe::shared_cpu_policy);
}
