// Fused routed-expert MLP over expert segments, CPU.
//
// The same math as the Python `deepseek_moe::segment_mlp` op (backends/grouped.py), with the per-expert
// glue in C++: for each expert, gather its rows, gate_up GEMM, SwiGLU·w in one pass, down GEMM, and add the
// rows into y while they are still in cache. The GEMMs go to ATen (MKL / oneDNN); the element-wise work and
// the row scatter are single passes parallelised over rows. With a limit L (DeepSeek-V4's swiglu_limit) the
// SwiGLU is silu(min(g, L)) · clamp(u, −L, L), clamped inside the same passes: silu(g) comes from ATen's
// vectorised kernel on the unclamped g, and where g > L the pass uses the constant silu(L) instead.
//
// Legend: T tokens, H hidden size, I expert hidden size, J = 2·I (gate rows then up rows), E experts,
// N sorted (token, slot) pairs, n pairs of the current expert.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "expert_inputs.h"
#include "expert_segments.h"

namespace deepseek_moe {
namespace {

using at::Tensor;

// Rows per task in the element-wise loops: a few KB of work each, so small segments stay on one thread.
constexpr int64_t kRowGrain = 8;
// Columns per task in the row scatter.
constexpr int64_t kColumnGrain = 256;

std::vector<int64_t> host_counts(const Tensor& counts_E) {
  Tensor c = counts_E.to(at::kCPU, at::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

// dst_TH[token[i]] += src_nH[i] for i < n. Padded segments repeat a token (align_segments points padding rows
// at token 0), so the work is split over columns, never rows: no two threads touch the same element.
template <typename scalar_t, typename acc_t>
void scatter_add_rows(acc_t* dst_TH, const scalar_t* src_nH, const int64_t* token_n, int64_t n, int64_t H) {
  at::parallel_for(0, H, kColumnGrain, [&](int64_t j0, int64_t j1) {
    for (int64_t i = 0; i < n; ++i) {
      acc_t* dst = dst_TH + token_n[i] * H;
      const scalar_t* src = src_nH + i * H;
      for (int64_t j = j0; j < j1; ++j) dst[j] += static_cast<acc_t>(src[j]);
    }
  });
}

// Calls fn(e, start, n) for every expert with n > 0 pairs (segment [start, start + n) of the sorted pairs), in
// expert order, so the K-way sums have a fixed order. Running two experts at once on one thread each measured
// no faster on a 2-core CPU than MKL splitting each GEMM (docs/benchmarks.md).
template <typename Fn>
void for_each_expert(const std::vector<int64_t>& counts, Fn&& fn) {
  int64_t start = 0;
  for (size_t e = 0; e < counts.size(); ++e) {
    if (counts[e] > 0) fn(static_cast<int64_t>(e), start, counts[e]);
    start += counts[e];
  }
}

// The SwiGLU's clamp (swiglu_limit): L = +inf for none, which makes every test below a no-op.
template <typename acc_t>
struct Clamp {
  acc_t limit, silu_limit;  // L and silu(L)
  explicit Clamp(std::optional<double> L)
      : limit(glu_limit<acc_t>(L)),
        silu_limit(L ? static_cast<acc_t>(*L / (1.0 + std::exp(-*L))) : acc_t(0)) {}
  acc_t up(acc_t u) const { return std::min(std::max(u, -limit), limit); }
  bool passes_up(acc_t u) const { return u >= -limit && u <= limit; }  // torch.clamp passes the gradient at a bound
};

// a_nI = silu(min(g, L)) · clamp(u, −L, L) · w, from h_nJ and silu(g) of the unclamped gate, computed in acc_t.
template <typename scalar_t, typename acc_t>
void swiglu_forward(const scalar_t* h_nJ, const acc_t* silu_nI, const acc_t* w_n, scalar_t* a_nI, int64_t n,
                    int64_t I, const Clamp<acc_t>& clamp) {
  at::parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* g = h_nJ + i * 2 * I;
      const scalar_t* up = g + I;
      const acc_t* s = silu_nI + i * I;
      const acc_t w = w_n[i];
      scalar_t* a = a_nI + i * I;
      for (int64_t j = 0; j < I; ++j) {
        const acc_t silu = static_cast<acc_t>(g[j]) > clamp.limit ? clamp.silu_limit : s[j];
        a[j] = static_cast<scalar_t>(silu * clamp.up(static_cast<acc_t>(up[j])) * w);
      }
    }
  });
}

// Given sigmoid(gate) in sig_nI and the incoming gradient dy_nI of a = silu(g)·u·w (g, u clamped first):
//   grad_h = [dy·w·u·σ(g)(1 + g(1 − σ(g))) ; dy·w·silu(g)],  grad_w = Σ_j dy·silu(g)·u,  a = silu(g)·u·w,
// each half of grad_h zero where its clamp is active.
template <typename scalar_t, typename acc_t>
void swiglu_backward(const scalar_t* h_nJ, const acc_t* sig_nI, const scalar_t* dy_nI, const acc_t* w_n,
                     scalar_t* grad_h_nJ, scalar_t* a_nI, acc_t* grad_w_n, int64_t n, int64_t I,
                     const Clamp<acc_t>& clamp) {
  at::parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* g = h_nJ + i * 2 * I;
      const scalar_t* u = g + I;
      const acc_t* s = sig_nI + i * I;
      const scalar_t* dy = dy_nI + i * I;
      scalar_t* dg = grad_h_nJ + i * 2 * I;
      scalar_t* du = dg + I;
      scalar_t* a = a_nI + i * I;
      const acc_t w = w_n[i];
      acc_t gw = 0;
      for (int64_t j = 0; j < I; ++j) {
        const acc_t gj = static_cast<acc_t>(g[j]), u0 = static_cast<acc_t>(u[j]), uj = clamp.up(u0);
        const bool gate_clamped = gj > clamp.limit;
        const acc_t sj = s[j], silu = gate_clamped ? clamp.silu_limit : gj * sj;
        const acc_t dyj = static_cast<acc_t>(dy[j]);
        const acc_t a0 = silu * uj;
        gw += dyj * a0;
        const acc_t dyw = dyj * w;
        du[j] = static_cast<scalar_t>(clamp.passes_up(u0) ? dyw * silu : acc_t(0));
        dg[j] = static_cast<scalar_t>(gate_clamped ? acc_t(0) : dyw * uj * (sj * (acc_t(1) + gj * (acc_t(1) - sj))));
        a[j] = static_cast<scalar_t>(a0 * w);
      }
      grad_w_n[i] = gw;
    }
  });
}

}  // namespace

std::tuple<Tensor, Tensor> segment_mlp_fused_cpu(const Tensor& x_in, const Tensor& gate_up_in, const Tensor& down_in,
                                                 const Tensor& token_in, const Tensor& weight_in,
                                                 const Tensor& counts_E, std::optional<double> limit) {
  check_expert_inputs("segment_mlp", x_in, gate_up_in, down_in, token_in, weight_in, counts_E);
  const Tensor x_TH = x_in.contiguous(), gate_up = gate_up_in.contiguous(), down = down_in.contiguous();
  const Tensor token_N = token_in.contiguous(), weight_N = weight_in.contiguous();
  const int64_t T = x_TH.size(0), H = x_TH.size(1), I = down.size(2), N = token_N.size(0);
  const std::vector<int64_t> counts = host_counts(counts_E);
  const auto acc = at::toOpMathType(x_TH.scalar_type());
  Tensor y_TH = at::zeros({T, H}, x_TH.options().dtype(acc));
  Tensor h_NJ = at::empty({N, 2 * I}, x_TH.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_TH.scalar_type(), "segment_mlp_fused", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Clamp<acc_t> clamp(limit);
    for_each_expert(counts, [&](int64_t e, int64_t start, int64_t n) {
      const Tensor tok_n = token_N.narrow(0, start, n);
      Tensor h_nJ = h_NJ.narrow(0, start, n);
      at::mm_out(h_nJ, x_TH.index_select(0, tok_n), gate_up[e].t());
      const Tensor silu_nI = at::silu(h_nJ.narrow(1, 0, I).to(acc));
      Tensor a_nI = at::empty({n, I}, x_TH.options());
      swiglu_forward<scalar_t, acc_t>(h_nJ.const_data_ptr<scalar_t>(), silu_nI.const_data_ptr<acc_t>(),
                                      weight_N.const_data_ptr<acc_t>() + start, a_nI.mutable_data_ptr<scalar_t>(),
                                      n, I, clamp);
      const Tensor out_nH = at::mm(a_nI, down[e].t());
      scatter_add_rows<scalar_t, acc_t>(y_TH.mutable_data_ptr<acc_t>(), out_nH.const_data_ptr<scalar_t>(),
                                        tok_n.const_data_ptr<int64_t>(), n, H);
    });
  });
  return {y_TH.to(x_TH.scalar_type()), h_NJ};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> segment_mlp_fused_backward_cpu(
    const Tensor& grad_y_in, const Tensor& x_in, const Tensor& gate_up_in, const Tensor& down_in,
    const Tensor& token_in, const Tensor& weight_in, const Tensor& counts_E, const Tensor& h_in,
    std::optional<double> limit) {
  check_expert_inputs("segment_mlp", x_in, gate_up_in, down_in, token_in, weight_in, counts_E);
  const Tensor grad_y_TH = grad_y_in.contiguous(), x_TH = x_in.contiguous();
  const Tensor gate_up = gate_up_in.contiguous(), down = down_in.contiguous();
  const Tensor token_N = token_in.contiguous(), weight_N = weight_in.contiguous(), h_NJ = h_in.contiguous();
  const int64_t T = x_TH.size(0), H = x_TH.size(1), I = down.size(2), E = gate_up.size(0);
  TORCH_CHECK(grad_y_TH.sizes() == x_TH.sizes() && grad_y_TH.scalar_type() == x_TH.scalar_type(),
              "segment_mlp_backward: grad_y must match x");
  const std::vector<int64_t> counts = host_counts(counts_E);
  const auto acc = at::toOpMathType(x_TH.scalar_type());
  Tensor grad_x_TH = at::zeros({T, H}, x_TH.options().dtype(acc));
  Tensor grad_gate_up = at::empty_like(gate_up), grad_down = at::empty_like(down);
  Tensor grad_w_N = at::empty_like(weight_N);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_TH.scalar_type(), "segment_mlp_fused_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Clamp<acc_t> clamp(limit);
    for (int64_t e = 0; e < E; ++e) {
      if (counts[e] == 0) {
        grad_gate_up[e].zero_();
        grad_down[e].zero_();
      }
    }
    for_each_expert(counts, [&](int64_t e, int64_t start, int64_t n) {
      const Tensor tok_n = token_N.narrow(0, start, n);
      const Tensor h_nJ = h_NJ.narrow(0, start, n);
      const Tensor grad_out_nH = grad_y_TH.index_select(0, tok_n);
      const Tensor grad_a_nI = at::mm(grad_out_nH, down[e]);
      const Tensor sig_nI = at::sigmoid(h_nJ.narrow(1, 0, I).to(acc));
      Tensor grad_h_nJ = at::empty({n, 2 * I}, x_TH.options());
      Tensor a_nI = at::empty({n, I}, x_TH.options());
      swiglu_backward<scalar_t, acc_t>(h_nJ.const_data_ptr<scalar_t>(), sig_nI.const_data_ptr<acc_t>(),
                                       grad_a_nI.const_data_ptr<scalar_t>(),
                                       weight_N.const_data_ptr<acc_t>() + start,
                                       grad_h_nJ.mutable_data_ptr<scalar_t>(), a_nI.mutable_data_ptr<scalar_t>(),
                                       grad_w_N.mutable_data_ptr<acc_t>() + start, n, I, clamp);
      Tensor grad_down_e = grad_down[e], grad_gate_up_e = grad_gate_up[e];
      at::mm_out(grad_down_e, grad_out_nH.t(), a_nI);
      at::mm_out(grad_gate_up_e, grad_h_nJ.t(), x_TH.index_select(0, tok_n));
      const Tensor grad_x_nH = at::mm(grad_h_nJ, gate_up[e]);
      scatter_add_rows<scalar_t, acc_t>(grad_x_TH.mutable_data_ptr<acc_t>(), grad_x_nH.const_data_ptr<scalar_t>(),
                                        tok_n.const_data_ptr<int64_t>(), n, H);
    });
  });
  return {grad_x_TH.to(x_TH.scalar_type()), grad_gate_up, grad_down, grad_w_N};
}

TORCH_LIBRARY_IMPL(deepseek_moe, CPU, m) {
  m.impl("segment_mlp_fused", &segment_mlp_fused_cpu);
  m.impl("segment_mlp_fused_backward", &segment_mlp_fused_backward_cpu);
}

}  // namespace deepseek_moe
