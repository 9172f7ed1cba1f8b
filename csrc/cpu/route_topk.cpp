// The router's choice for inference on the CPU, after its gate GEMM: scores, the (group-limited) top-k with the
// balancing bias, and the gate weights, in one call.
//
// A decode step's experts stream in about a millisecond; the ten-odd ATen ops and the Python between them that
// compute the same choice took 0.16-0.2 ms of a cold step (docs/benchmarks.md), and torch.topk alone 0.4 ms at
// T = 512. Here, per token:
//   scores = softmax, sigmoid or sqrt(softplus) of the logits (softplus as torch's: x above 20 stays x);
//   choice = scores + bias (DeepSeek-V3 §2.1.2: the bias steers the choice, never the weights);
//   with G groups, only the topk_groups groups of highest score (their max, or the sum of their top 2) stay
//   (DeepSeek-V2 §2.2.2, V3's node-limited routing);
//   the top_k experts of those, best first;
//   weight = the scores there, divided by their sum (+1e-20) when norm, times scale.
// The scores come from the ATen ops the Python router calls (softmax; sigmoid and softplus in position-invariant
// arithmetic; sqrt) on the same logits, so they are its bits, and every top-k here is torch.topk's own CPU
// algorithm (ATen's TopKImpl.h: the same selection and sort over (value, index) pairs, NaN above every number), so
// equal scores (a saturated sigmoid, a zero-initialised gate) and scores an ulp apart pick the same experts in the
// same order as the Python router: the layer computes one function with or without autograd.
//
// Legend: T tokens, E experts, K experts per token, G groups, M = E / G experts per group.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "inference_ops.h"

namespace deepseek_moe {
namespace {

using at::Tensor;

enum ScoreFunc : int64_t { kSoftmax = 0, kSigmoid = 1, kSqrtSoftplus = 2 };
enum GroupScore : int64_t { kMax = 0, kTop2Sum = 1 };

// The router's scores of (T, E) logits, by the ATen ops router.py calls (deepseek_moe/invariant.py's sigmoid and
// softplus): its bits (a scalar exp of our own rounded differently by an ulp now and then). Not at::sigmoid or
// at::softplus: their vector body and scalar tail differ in the last bit, so a token's scores would depend on its
// place in the batch; exp, log1p, + and reciprocal run one routine over every element.
Tensor scores_of(const Tensor& logits, int64_t score_func) {
  if (score_func == kSoftmax) return at::softmax(logits, -1);
  if (score_func == kSigmoid) return at::reciprocal(at::exp(-logits) + 1);
  const Tensor softplus =
      at::where(logits > 20, logits, at::log1p(at::exp(at::clamp(logits, c10::nullopt, 20))));
  return at::sqrt(softplus);
}

using Entry = std::pair<float, int64_t>;

// torch.topk's order (largest first): NaN above every number.
bool above(const Entry& x, const Entry& y) {
  return (std::isnan(x.first) && !std::isnan(y.first)) || x.first > y.first;
}

// The indices of the k largest of v[0, n), best first, into out, where the k + 1 largest are distinct numbers (no
// NaN): then the top k and their order are the same whatever the selection, and one pass keeping them sorted (a
// comparison per value once they are full) does it. false where a tie or a NaN could decide, and out untouched.
// kept: scratch of n entries.
bool topk_distinct(const float* v, int64_t n, int64_t k, std::vector<Entry>& kept, int64_t* out) {
  const int64_t m = std::min(k + 1, n);
  int64_t size = 0;
  for (int64_t j = 0; j < n; ++j) {
    const float x = v[j];
    if (std::isnan(x)) return false;
    if (size == m && !(x > kept[m - 1].first)) continue;
    int64_t at = size < m ? size++ : m - 1;
    for (; at > 0 && x > kept[at - 1].first; --at) kept[at] = kept[at - 1];
    kept[at] = {x, j};
  }
  for (int64_t i = 1; i < size; ++i)
    if (kept[i].first == kept[i - 1].first) return false;
  for (int64_t i = 0; i < k; ++i) out[i] = kept[i].second;
  return true;
}

// The indices of the k largest of v[0, n), best first, into out: where ties or NaN could decide, ATen's
// topk_impl_loop (largest, sorted) step by step, so that they resolve as torch.topk resolves them. queue: scratch
// of n entries.
void topk_as_torch(const float* v, int64_t n, int64_t k, std::vector<Entry>& queue, int64_t* out) {
  if (topk_distinct(v, n, k, queue, out)) return;
  for (int64_t j = 0; j < n; ++j) queue[j] = {v[j], j};
  if (k * 64 <= n) {
    std::partial_sort(queue.begin(), queue.begin() + k, queue.begin() + n, above);
  } else {
    std::nth_element(queue.begin(), queue.begin() + k - 1, queue.begin() + n, above);
    std::sort(queue.begin(), queue.begin() + k - 1, above);
  }
  for (int64_t j = 0; j < k; ++j) out[j] = queue[j].second;
}

Tensor check_logits(const Tensor& logits, const Tensor& bias) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat,
              "route_topk: logits must be (T, E) float32, got ", logits.scalar_type(), " ", logits.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == logits.size(1) && bias.scalar_type() == at::kFloat,
              "route_topk: bias must be (E,) float32 with E = ", logits.size(1));
  return logits.contiguous();
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> route_topk_cpu(const Tensor& logits_in, const Tensor& bias_in, int64_t score_func,
                                                  int64_t top_k, int64_t num_groups, int64_t topk_groups,
                                                  int64_t group_score, bool norm, double scale) {
  const Tensor logits = check_logits(logits_in, bias_in);
  const Tensor bias = bias_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1), G = num_groups;
  TORCH_CHECK(score_func >= kSoftmax && score_func <= kSqrtSoftplus, "route_topk: unknown score_func ", score_func);
  TORCH_CHECK(G >= 1 && E % G == 0 && topk_groups >= 1 && topk_groups <= G,
              "route_topk: ", G, " groups of ", E, " experts, keeping ", topk_groups, ", is not a grouping");
  TORCH_CHECK(group_score == kMax || group_score == kTop2Sum, "route_topk: unknown group_score ", group_score);
  TORCH_CHECK(top_k >= 1, "route_topk: top_k=", top_k, " must be at least 1");
  TORCH_CHECK(top_k <= topk_groups * (E / G),
              "route_topk: top_k=", top_k, " exceeds the ", topk_groups * (E / G), " experts of the kept groups");
  TORCH_CHECK(group_score == kMax || G == 1 || E / G >= 2, "route_topk: a top-2 group score needs 2 experts a group");
  const int64_t M = E / G;
  const Tensor scores = scores_of(logits, score_func).contiguous();
  Tensor idx = at::empty({T, top_k}, logits.options().dtype(at::kLong));
  Tensor weight = at::empty({T, top_k}, logits.options());
  const float* b = bias.const_data_ptr<float>();
  const float* sc = scores.const_data_ptr<float>();
  int64_t* id = idx.mutable_data_ptr<int64_t>();
  float* w = weight.mutable_data_ptr<float>();
  at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
    std::vector<float> choice(E), group(G);
    std::vector<Entry> queue(std::max(E, G));
    std::vector<int64_t> kept(topk_groups);
    std::vector<char> keep(G);
    for (int64_t t = t0; t < t1; ++t) {
      const float* s = sc + t * E;
      for (int64_t e = 0; e < E; ++e) choice[e] = s[e] + b[e];
      if (G > 1) {
        for (int64_t g = 0; g < G; ++g) {
          const float* c = choice.data() + g * M;
          if (group_score == kMax) {  // amax: NaN wins
            float top = c[0];
            for (int64_t m = 1; m < M; ++m)
              if (!std::isnan(top) && (std::isnan(c[m]) || c[m] > top)) top = c[m];
            group[g] = top;
          } else {  // the sum of the two largest, as topk(2).values.sum()
            int64_t two[2];
            topk_as_torch(c, M, 2, queue, two);
            group[g] = c[two[0]] + c[two[1]];
          }
        }
        topk_as_torch(group.data(), G, topk_groups, queue, kept.data());
        std::fill(keep.begin(), keep.end(), 0);
        for (int64_t g : kept) keep[g] = 1;
        for (int64_t g = 0; g < G; ++g)
          if (!keep[g])
            std::fill(choice.begin() + g * M, choice.begin() + (g + 1) * M,
                      -std::numeric_limits<float>::infinity());
      }
      topk_as_torch(choice.data(), E, top_k, queue, id + t * top_k);
      float total = 0.f;
      for (int64_t k = 0; k < top_k; ++k) total += (w[t * top_k + k] = s[id[t * top_k + k]]);
      for (int64_t k = 0; k < top_k; ++k) {
        float v = w[t * top_k + k];
        if (norm) v = v / (total + 1e-20f);
        w[t * top_k + k] = v * static_cast<float>(scale);
      }
    }
  });
  return {scores, idx, weight};
}

TORCH_LIBRARY_IMPL(deepseek_moe, CPU, m) {
  m.impl("route_topk", &route_topk_cpu);
}

}  // namespace deepseek_moe
