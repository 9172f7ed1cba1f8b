// Dispatch on CPU: routing metadata by counting sort, and the weighted combine (K-way sum into token rows), each
// one parallel pass. These are the same maps as the torch ops in deepseek_moe/dispatch.py (build_plan,
// combine_rows) and give the same results (bit-identical unweighted).
//
// Legend: T tokens, K slots per token, P = T·K pairs (p = t·K + k), E experts, N sorted pairs, H hidden size.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "inference_ops.h"

namespace deepseek_moe {
namespace {

using at::Tensor;

// Pairs per chunk of the counting sort: big enough that the per-chunk (E,) histograms stay cheap.
constexpr int64_t kSortGrain = 1 << 14;
// Token rows per task in the row loops.
constexpr int64_t kRowGrain = 16;

}  // namespace

// Stable counting sort of the pairs by expert. topk_idx_TK: int64 (T, K) in [0, E).
// Returns counts_E, offsets_E1 (E+1), pair_N (pair ids in expert order, token order within an expert),
// token_N (pair_N // K), slot_TK (position of each pair in the sorted order).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> route_plan_cpu(const Tensor& topk_idx_TK, int64_t num_experts) {
  TORCH_CHECK(topk_idx_TK.dim() == 2 && topk_idx_TK.scalar_type() == at::kLong,
              "route_plan: topk_idx must be an int64 (T, K) tensor, got ", topk_idx_TK.scalar_type(), " ",
              topk_idx_TK.sizes());
  TORCH_CHECK(num_experts > 0, "route_plan: num_experts must be positive");
  const Tensor idx = topk_idx_TK.contiguous();
  const int64_t T = idx.size(0), K = idx.size(1), P = T * K, E = num_experts;
  const int64_t* expert_P = idx.const_data_ptr<int64_t>();
  const auto opts = idx.options();

  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (P + kSortGrain - 1) / kSortGrain));
  const int64_t chunk_len = (P + chunks - 1) / std::max<int64_t>(chunks, 1);
  std::vector<int64_t> hist(chunks * E, 0);
  std::atomic<bool> out_of_range{false};
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* h = hist.data() + c * E;
      for (int64_t p = c * chunk_len, end = std::min(P, (c + 1) * chunk_len); p < end; ++p) {
        const int64_t e = expert_P[p];
        if (e < 0 || e >= E) {
          out_of_range.store(true, std::memory_order_relaxed);
          continue;
        }
        ++h[e];
      }
    }
  });
  TORCH_CHECK(!out_of_range.load(), "route_plan: expert ids must lie in [0, ", E, ")");

  Tensor counts_E = at::empty({E}, opts), offsets_E1 = at::empty({E + 1}, opts);
  int64_t* counts = counts_E.mutable_data_ptr<int64_t>();
  int64_t* offsets = offsets_E1.mutable_data_ptr<int64_t>();
  // Expert-major, chunk-minor running sum: chunk c's pairs of expert e start after earlier chunks' (stable).
  int64_t running = 0;
  for (int64_t e = 0; e < E; ++e) {
    offsets[e] = running;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t n = hist[c * E + e];
      hist[c * E + e] = running;
      running += n;
    }
    counts[e] = running - offsets[e];
  }
  offsets[E] = running;

  Tensor pair_N = at::empty({P}, opts), token_N = at::empty({P}, opts), slot_TK = at::empty({T, K}, opts);
  int64_t* pair = pair_N.mutable_data_ptr<int64_t>();
  int64_t* token = token_N.mutable_data_ptr<int64_t>();
  int64_t* slot = slot_TK.mutable_data_ptr<int64_t>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* next = hist.data() + c * E;
      for (int64_t p = c * chunk_len, end = std::min(P, (c + 1) * chunk_len); p < end; ++p) {
        const int64_t pos = next[expert_P[p]]++;
        pair[pos] = p;
        token[pos] = p / K;
        slot[p] = pos;
      }
    }
  });
  return {counts_E, offsets_E1, pair_N, token_N, slot_TK};
}

// y_TH[t] = Σ_k w[t, k] · o_NH[slot[t, k]] (w = 1 without weight), accumulated in fp32 (fp64 for fp64) in slot
// order; slot == N marks a dropped pair and adds nothing. y has o's dtype.
Tensor combine_cpu(const Tensor& o_in, const Tensor& slot_in, const std::optional<Tensor>& weight_in) {
  TORCH_CHECK(o_in.dim() == 2 && slot_in.dim() == 2 && slot_in.scalar_type() == at::kLong,
              "combine: expected o (N, H) and int64 slot (T, K)");
  const Tensor o_NH = o_in.contiguous(), slot_TK = slot_in.contiguous();
  const int64_t N = o_NH.size(0), H = o_NH.size(1), T = slot_TK.size(0), K = slot_TK.size(1);
  const auto acc = at::toOpMathType(o_NH.scalar_type());
  Tensor weight_TK;
  if (weight_in.has_value()) {
    TORCH_CHECK(weight_in->sizes() == slot_TK.sizes(), "combine: weight must be (T, K) like slot");
    weight_TK = weight_in->to(acc).contiguous();
  }
  Tensor y_TH = at::empty({T, H}, o_NH.options());
  std::atomic<bool> bad{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, o_NH.scalar_type(), "combine", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* o = o_NH.const_data_ptr<scalar_t>();
    const int64_t* slot = slot_TK.const_data_ptr<int64_t>();
    const acc_t* w = weight_TK.defined() ? weight_TK.const_data_ptr<acc_t>() : nullptr;
    scalar_t* y = y_TH.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, T, kRowGrain, [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> row(H);
      for (int64_t t = t0; t < t1; ++t) {
        std::fill(row.begin(), row.end(), acc_t(0));
        for (int64_t k = 0; k < K; ++k) {
          const int64_t n = slot[t * K + k];
          if (n < 0 || n > N) bad.store(true, std::memory_order_relaxed);
          if (n < 0 || n >= N) continue;
          const scalar_t* src = o + n * H;
          if (w) {
            const acc_t wk = w[t * K + k];
            for (int64_t h = 0; h < H; ++h) row[h] += wk * static_cast<acc_t>(src[h]);
          } else {
            for (int64_t h = 0; h < H; ++h) row[h] += static_cast<acc_t>(src[h]);
          }
        }
        scalar_t* dst = y + t * H;
        for (int64_t h = 0; h < H; ++h) dst[h] = static_cast<scalar_t>(row[h]);
      }
    });
  });
  TORCH_CHECK(!bad.load(), "combine: slots must lie in [0, ", N, "] (", N, " marks a dropped pair)");
  return y_TH;
}

// Backward of combine: grad_o[slot[t, k]] = w[t, k] · grad_y[t] (o's dtype), and with a weight
// grad_w[t, k] = <o[slot[t, k]], grad_y[t]> (fp32; 0 for dropped pairs). Without a weight grad_w is undefined.
// Each sorted row belongs to exactly one (t, k), so the loop over tokens writes every row once, race-free.
std::tuple<Tensor, Tensor> combine_backward_cpu(const Tensor& grad_y_in, const Tensor& o_in, const Tensor& slot_in,
                                                const std::optional<Tensor>& weight_in) {
  const Tensor grad_y_TH = grad_y_in.contiguous(), o_NH = o_in.contiguous(), slot_TK = slot_in.contiguous();
  const int64_t N = o_NH.size(0), H = o_NH.size(1), T = slot_TK.size(0), K = slot_TK.size(1);
  TORCH_CHECK(grad_y_TH.sizes() == at::IntArrayRef({T, H}), "combine_backward: grad_y must be (T, H)");
  const auto acc = at::toOpMathType(o_NH.scalar_type());
  const bool weighted = weight_in.has_value();
  Tensor weight_TK = weighted ? weight_in->to(acc).contiguous() : Tensor();
  // Every sorted row belongs to exactly one kept (t, k), so every row is written below: no zero fill.
  Tensor grad_o_NH = at::empty({N, H}, o_NH.options());
  Tensor grad_w_TK = weighted ? at::empty({T, K}, o_NH.options().dtype(acc)) : Tensor();
  const Tensor grad_y = grad_y_TH.to(o_NH.scalar_type());
  std::atomic<bool> bad{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, o_NH.scalar_type(), "combine_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gy = grad_y.const_data_ptr<scalar_t>();
    const scalar_t* o = o_NH.const_data_ptr<scalar_t>();
    const int64_t* slot = slot_TK.const_data_ptr<int64_t>();
    const acc_t* w = weighted ? weight_TK.const_data_ptr<acc_t>() : nullptr;
    scalar_t* go = grad_o_NH.mutable_data_ptr<scalar_t>();
    acc_t* gw = weighted ? grad_w_TK.mutable_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, T, kRowGrain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t* g = gy + t * H;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t n = slot[t * K + k];
          if (n < 0 || n >= N) {
            if (n < 0 || n > N) bad.store(true, std::memory_order_relaxed);
            if (gw) gw[t * K + k] = acc_t(0);
            continue;
          }
          scalar_t* dst = go + n * H;
          if (w) {
            const scalar_t* src = o + n * H;
            const acc_t wk = w[t * K + k];
            acc_t dot = 0;
            for (int64_t h = 0; h < H; ++h) {
              const acc_t gh = static_cast<acc_t>(g[h]);
              dot += static_cast<acc_t>(src[h]) * gh;
              dst[h] = static_cast<scalar_t>(wk * gh);
            }
            gw[t * K + k] = dot;
          } else {
            std::memcpy(dst, g, H * sizeof(scalar_t));
          }
        }
      }
    });
  });
  TORCH_CHECK(!bad.load(), "combine_backward: slots must lie in [0, ", N, "] (", N, " marks a dropped pair)");
  return {grad_o_NH, grad_w_TK};
}

TORCH_LIBRARY_IMPL(deepseek_moe, CPU, m) {
  m.impl("route_plan", &route_plan_cpu);
  m.impl("combine", &combine_cpu);
  m.impl("combine_backward", &combine_backward_cpu);
}

}  // namespace deepseek_moe
