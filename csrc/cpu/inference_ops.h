// The CPU kernels of the extension's inference ops, for the ops that compose them (fused_moe.cpp). Each is also an
// op of its own (ops.cpp has the schemas and what each computes).
//
// Legend: T tokens, K experts per token, E experts, N sorted pairs, H hidden size.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace deepseek_moe {

// x (T, H) in fp32, bf16 or fp16, weight (E, H) fp32 -> logits (T, E) fp32, each a fixed-order dot product.
at::Tensor router_logits_cpu(const at::Tensor& x, const at::Tensor& weight);

// logits (T, E) fp32, bias (E,) fp32 -> scores (T, E), experts (T, K) best first, gate weights (T, K).
std::tuple<at::Tensor, at::Tensor, at::Tensor> route_topk_cpu(const at::Tensor& logits, const at::Tensor& bias,
                                                              int64_t score_func, int64_t top_k, int64_t num_groups,
                                                              int64_t topk_groups, int64_t group_score, bool norm,
                                                              double scale);

// topk_idx (T, K) -> counts (E,), offsets (E + 1,), pair (N,), token (N,), slot (T, K).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_plan_cpu(const at::Tensor& topk_idx_TK,
                                                                                      int64_t num_experts);

// The routed (and shared) experts of a few tokens, each chosen expert's rows streamed once -> y (T, H).
at::Tensor expert_gemv_cpu(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down,
                           const at::Tensor& token_N, const at::Tensor& weight_N, const at::Tensor& counts_E,
                           std::optional<double> limit, const std::optional<at::Tensor>& shared_gate,
                           const std::optional<at::Tensor>& shared_up, const std::optional<at::Tensor>& shared_down);

// The same for many tokens, in sorted blocks through GEMM micro-kernels -> y (T, H).
at::Tensor expert_blocks_cpu(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down,
                             const at::Tensor& token_N, const at::Tensor& weight_N, const at::Tensor& counts_E,
                             std::optional<double> limit, const std::optional<at::Tensor>& shared_gate,
                             const std::optional<at::Tensor>& shared_up, const std::optional<at::Tensor>& shared_down);

}  // namespace deepseek_moe
