// A layer's whole routed step for inference on the CPU in one call: the router's gate GEMM, its choice
// (route_topk), the plan (route_plan's stable counting sort), and the routed and shared experts with the weighted
// combine (expert_gemv for a decode step, expert_blocks for more tokens).
//
// A cold fp32 decode step streams its 35 MB of experts in about 1.6 ms; the stages as separate calls (the router's
// module, the plan's dataclass, the experts' module and their wrappers), their Python and ATen code cold in the
// caches after the weights went through them, took 0.18-0.24 ms more than this one call (docs/benchmarks.md). The
// gate GEMM is the one the Python router calls under the same strategy (router_logits for a decode step, ATen's
// linear for blocks), on the same operands, so the logits, and every choice made from them, are the pipeline's bits.
//
// x may carry leading dimensions (..., H), as a layer's input does: the tokens are its rows (T = x.numel() / H)
// and y comes back in x's shape, so the caller reshapes nothing (each call it saves is tens of microseconds in a
// cold decode step).
//
// Legend: T tokens, K experts per token, E experts, N = T·K sorted pairs, H hidden size.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "inference_ops.h"

namespace deepseek_moe {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> fused_moe_cpu(
    const Tensor& x_in, const Tensor& router_weight, const Tensor& bias, int64_t score_func, int64_t top_k,
    int64_t num_groups, int64_t topk_groups, int64_t group_score, bool norm, double scale, const Tensor& gate_up,
    const Tensor& down, std::optional<double> limit, bool blocks, const std::optional<Tensor>& shared_gate,
    const std::optional<Tensor>& shared_up, const std::optional<Tensor>& shared_down) {
  TORCH_CHECK(x_in.dim() >= 1, "fused_moe: x must be (..., H), got a 0-dim tensor");
  const Tensor x = x_in.dim() == 2 ? x_in : x_in.reshape({-1, x_in.size(-1)});
  TORCH_CHECK(router_weight.scalar_type() == at::kFloat && router_weight.dim() == 2 &&
                  router_weight.size(1) == x.size(1) && router_weight.size(0) == gate_up.size(0),
              "fused_moe: router_weight must be (E, H) float32 with E = ", gate_up.size(0), " and H = ", x.size(1),
              ", got ", router_weight.scalar_type(), " ", router_weight.sizes());
  // The composed ops' own names as profiler ranges (free while no profiler records): a profile shows which ran.
  Tensor logits;
  if (blocks) {
    logits = at::linear(x.to(at::kFloat), router_weight);
  } else {
    RECORD_FUNCTION("deepseek_moe::router_logits", std::vector<c10::IValue>());
    logits = router_logits_cpu(x, router_weight);
  }
  Tensor scores, topk_idx, topk_weight, counts, pair, token;
  {
    RECORD_FUNCTION("deepseek_moe::route_topk", std::vector<c10::IValue>());
    std::tie(scores, topk_idx, topk_weight) =
        route_topk_cpu(logits, bias, score_func, top_k, num_groups, topk_groups, group_score, norm, scale);
  }
  {
    RECORD_FUNCTION("deepseek_moe::route_plan", std::vector<c10::IValue>());
    std::tie(counts, std::ignore, pair, token, std::ignore) = route_plan_cpu(topk_idx, gate_up.size(0));
  }
  const Tensor weight_N = topk_weight.reshape(-1).index_select(0, pair).to(at::toOpMathType(x.scalar_type()));
  RECORD_FUNCTION(blocks ? "deepseek_moe::expert_blocks" : "deepseek_moe::expert_gemv", std::vector<c10::IValue>());
  const auto experts = blocks ? &expert_blocks_cpu : &expert_gemv_cpu;
  Tensor y = experts(x, gate_up, down, token, weight_N, counts, limit, shared_gate, shared_up, shared_down);
  if (x_in.dim() != 2) {
    y = at::_unsafe_view(y, x_in.sizes());  // y is this op's own: no view of it escapes
  }
  return {y, logits, scores, topk_idx, topk_weight, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(deepseek_moe, CPU, m) {
  m.impl("fused_moe", &fused_moe_cpu);
}

}  // namespace deepseek_moe
