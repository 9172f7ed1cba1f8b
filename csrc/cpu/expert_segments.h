// The GLU segments the inference ops of csrc/cpu (expert_gemv.cpp, expert_blocks.cpp) run over: one per routed
// expert with pairs, plus the shared experts (every token, weight 1) when they join the same pass.
//
// Legend: T tokens, H hidden size, I expert hidden size, Is shared experts' hidden size, E experts, N sorted
// (token, slot) pairs.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "expert_inputs.h"

namespace deepseek_moe {

// The SwiGLU clamp L of a swiglu_limit (+inf without one, which makes the clamps no-ops). A NaN limit is refused:
// std::min and std::max would drop it (no clamp), where torch.clamp gives NaN.
template <typename acc_t>
acc_t glu_limit(std::optional<double> limit) {
  TORCH_CHECK(!limit || !std::isnan(*limit), "deepseek_moe ext: the SwiGLU limit must not be NaN");
  return limit ? static_cast<acc_t>(*limit) : std::numeric_limits<acc_t>::infinity();
}

// silu(min(g, L)) · clamp(u, −L, L), the clamp in torch.clamp's order; a NaN in g or u stays NaN.
template <typename acc_t>
acc_t clamped_swiglu(acc_t g, acc_t u, acc_t L) {
  g = std::min(g, L);
  u = std::min(std::max(u, -L), L);
  return g / (acc_t(1) + std::exp(-g)) * u;
}

// One GLU expert and the pairs it serves: rows gate[i], up[i] (H each, i < width), down[h] (width each, h < H);
// pair p (count of them from first) reads token token[p] and is weighted by weight[p] (1 without weights).
template <typename scalar_t, typename acc_t>
struct Segment {
  const scalar_t *gate, *up, *down;
  int64_t width, first, count;
  const int64_t* token;
  const acc_t* weight;
};

template <typename scalar_t, typename acc_t>
struct Segments {
  std::vector<Segment<scalar_t, acc_t>> list;
  at::Tensor every_token;  // the shared segment's tokens 0..T−1: outlives the segments that point into it
};

// Routed experts in expert order (the order every y element receives its terms in), then the shared experts.
template <typename scalar_t, typename acc_t>
Segments<scalar_t, acc_t> build_segments(const at::Tensor& x_TH, const at::Tensor& gate_up, const at::Tensor& down,
                                         const at::Tensor& token_N, const at::Tensor& weight_N,
                                         const std::vector<int64_t>& counts,
                                         const std::optional<at::Tensor>& shared_gate,
                                         const std::optional<at::Tensor>& shared_up,
                                         const std::optional<at::Tensor>& shared_down) {
  const int64_t T = x_TH.size(0), H = x_TH.size(1), I = down.size(2);
  Segments<scalar_t, acc_t> out;
  const scalar_t* W1 = gate_up.const_data_ptr<scalar_t>();
  const scalar_t* W2 = down.const_data_ptr<scalar_t>();
  int64_t first = 0;
  for (size_t e = 0; e < counts.size(); ++e) {
    if (counts[e] > 0) {
      const scalar_t* gate = W1 + static_cast<int64_t>(e) * 2 * I * H;
      out.list.push_back({gate, gate + I * H, W2 + static_cast<int64_t>(e) * H * I, I, first, counts[e],
                          token_N.const_data_ptr<int64_t>(), weight_N.const_data_ptr<acc_t>()});
    }
    first += counts[e];
  }
  if (shared_gate) {
    out.every_token = at::arange(T, token_N.options());
    out.list.push_back({shared_gate->const_data_ptr<scalar_t>(), shared_up->const_data_ptr<scalar_t>(),
                        shared_down->const_data_ptr<scalar_t>(), shared_gate->size(0), 0, T,
                        out.every_token.template const_data_ptr<int64_t>(), nullptr});
  }
  return out;
}

// An inference op's inputs, checked (routed and shared: all three or none, of x's dtype; every count >= 0 and
// every token in [0, T), since the ops index x and y by them) and made contiguous, with the routed experts' pair
// counts on the host.
struct InferenceInputs {
  at::Tensor x_TH, gate_up, down, token_N, weight_N;
  std::vector<int64_t> counts;
  std::optional<at::Tensor> shared_gate, shared_up, shared_down;
};

inline InferenceInputs inference_inputs(const char* op, const at::Tensor& x_TH, const at::Tensor& gate_up,
                                        const at::Tensor& down, const at::Tensor& token_N, const at::Tensor& weight_N,
                                        const at::Tensor& counts_E, const std::optional<at::Tensor>& shared_gate,
                                        const std::optional<at::Tensor>& shared_up,
                                        const std::optional<at::Tensor>& shared_down) {
  check_expert_inputs(op, x_TH, gate_up, down, token_N, weight_N, counts_E);
  const int64_t H = x_TH.size(1), E = gate_up.size(0);
  TORCH_CHECK(shared_gate.has_value() == shared_up.has_value() && shared_up.has_value() == shared_down.has_value(),
              op, ": pass all three shared-expert weights or none");
  if (shared_gate) {
    const int64_t Is = shared_gate->size(0);
    const std::pair<const at::Tensor*, std::pair<int64_t, int64_t>> expected[] = {
        {&*shared_gate, {Is, H}}, {&*shared_up, {Is, H}}, {&*shared_down, {H, Is}}};
    const char* names[] = {"shared_gate", "shared_up", "shared_down"};
    for (int i = 0; i < 3; ++i) {
      const at::Tensor& w = *expected[i].first;
      const auto [rows, cols] = expected[i].second;
      TORCH_CHECK(w.dim() == 2 && w.size(0) == rows && w.size(1) == cols && w.scalar_type() == x_TH.scalar_type() &&
                      w.device() == x_TH.device(),
                  op, ": ", names[i], " must be a (", rows, ", ", cols, ") tensor of x's dtype, got ", w.sizes(), " ",
                  w.scalar_type());
    }
  }
  const at::Tensor counts_cpu = counts_E.to(at::kCPU, at::kLong).contiguous();
  std::vector<int64_t> counts(counts_cpu.const_data_ptr<int64_t>(), counts_cpu.const_data_ptr<int64_t>() + E);
  int64_t pairs = 0;
  for (int64_t n : counts) {
    TORCH_CHECK(n >= 0, op, ": counts_E must be >= 0, got ", n);
    pairs += n;
  }
  TORCH_CHECK(pairs == token_N.size(0), op, ": counts_E sum to ", pairs, ", token_N has ", token_N.size(0));
  const at::Tensor token = token_N.contiguous();
  const int64_t T = x_TH.size(0);
  const int64_t* t = token.const_data_ptr<int64_t>();
  for (int64_t p = 0; p < pairs; ++p)
    TORCH_CHECK(t[p] >= 0 && t[p] < T, op, ": token_N[", p, "] = ", t[p], " is outside [0, T = ", T, ")");
  auto contiguous = [](const std::optional<at::Tensor>& w) {
    return w ? std::optional<at::Tensor>(w->contiguous()) : std::nullopt;
  };
  return {x_TH.contiguous(),       gate_up.contiguous(),    down.contiguous(),
          token,                   weight_N.contiguous(),   std::move(counts),
          contiguous(shared_gate), contiguous(shared_up),   contiguous(shared_down)};
}

}  // namespace deepseek_moe
