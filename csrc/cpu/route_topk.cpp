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
//   the top_k experts of those, best first (ties: the lower index);
//   weight = the scores there, divided by their sum (+1e-20) when norm, times scale.
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

namespace deepseek_moe {
namespace {

using at::Tensor;

enum ScoreFunc : int64_t { kSoftmax = 0, kSigmoid = 1, kSqrtSoftplus = 2 };
enum GroupScore : int64_t { kMax = 0, kTop2Sum = 1 };

void scores_of(const float* logits, int64_t E, int64_t score_func, float* scores) {
  if (score_func == kSoftmax) {
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t e = 0; e < E; ++e) top = std::max(top, logits[e]);
    float sum = 0.f;
    for (int64_t e = 0; e < E; ++e) sum += (scores[e] = std::exp(logits[e] - top));
    for (int64_t e = 0; e < E; ++e) scores[e] /= sum;
  } else if (score_func == kSigmoid) {
    for (int64_t e = 0; e < E; ++e) scores[e] = 1.f / (1.f + std::exp(-logits[e]));
  } else {
    for (int64_t e = 0; e < E; ++e) {
      const float x = logits[e];
      scores[e] = std::sqrt(x > 20.f ? x : std::log1p(std::exp(x)));
    }
  }
}

// a ranks above b as in torch.topk: NaN above every number.
bool above(float a, float b) {
  return std::isnan(a) ? !std::isnan(b) : a > b;
}

// The index of the largest of v[0, n) not yet taken (ties: the lower index); the caller leaves one to take.
int64_t best_left(const float* v, int64_t n, const std::vector<char>& taken) {
  int64_t best = -1;
  for (int64_t i = 0; i < n; ++i)
    if (!taken[i] && (best < 0 || above(v[i], v[best]))) best = i;
  return best;
}

Tensor check_logits(const Tensor& logits, const Tensor& bias) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat,
              "route_topk: logits must be (T, E) float32, got ", logits.scalar_type(), " ", logits.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == logits.size(1) && bias.scalar_type() == at::kFloat,
              "route_topk: bias must be (E,) float32 with E = ", logits.size(1));
  return logits.contiguous();
}

std::tuple<Tensor, Tensor, Tensor> route_topk_cpu(const Tensor& logits_in, const Tensor& bias_in, int64_t score_func,
                                                  int64_t top_k, int64_t num_groups, int64_t topk_groups,
                                                  int64_t group_score, bool norm, double scale) {
  const Tensor logits = check_logits(logits_in, bias_in);
  const Tensor bias = bias_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1), G = num_groups;
  TORCH_CHECK(score_func >= kSoftmax && score_func <= kSqrtSoftplus, "route_topk: unknown score_func ", score_func);
  TORCH_CHECK(G >= 1 && E % G == 0 && topk_groups >= 1 && topk_groups <= G,
              "route_topk: ", G, " groups of ", E, " experts, keeping ", topk_groups, ", is not a grouping");
  TORCH_CHECK(top_k >= 1 && top_k <= topk_groups * (E / G),
              "route_topk: top_k=", top_k, " exceeds the ", topk_groups * (E / G), " experts of the kept groups");
  const int64_t M = E / G;
  Tensor scores = at::empty({T, E}, logits.options());
  Tensor idx = at::empty({T, top_k}, logits.options().dtype(at::kLong));
  Tensor weight = at::empty({T, top_k}, logits.options());
  const float* lg = logits.const_data_ptr<float>();
  const float* b = bias.const_data_ptr<float>();
  float* sc = scores.mutable_data_ptr<float>();
  int64_t* id = idx.mutable_data_ptr<int64_t>();
  float* w = weight.mutable_data_ptr<float>();
  at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
    std::vector<float> choice(E), group(G);
    std::vector<char> taken(std::max(E, G));
    for (int64_t t = t0; t < t1; ++t) {
      float* s = sc + t * E;
      scores_of(lg + t * E, E, score_func, s);
      for (int64_t e = 0; e < E; ++e) choice[e] = s[e] + b[e];
      if (G > 1) {
        for (int64_t g = 0; g < G; ++g) {
          const float* c = choice.data() + g * M;
          float first = -std::numeric_limits<float>::infinity(), second = first;
          for (int64_t m = 0; m < M; ++m) {
            if (above(c[m], first)) {
              second = first;
              first = c[m];
            } else if (above(c[m], second)) {
              second = c[m];
            }
          }
          group[g] = group_score == kMax || M < 2 ? first : first + second;
        }
        std::fill(taken.begin(), taken.end(), 0);
        for (int64_t k = 0; k < topk_groups; ++k) taken[best_left(group.data(), G, taken)] = 1;
        for (int64_t g = 0; g < G; ++g)
          if (!taken[g])
            std::fill(choice.begin() + g * M, choice.begin() + (g + 1) * M,
                      -std::numeric_limits<float>::infinity());
      }
      std::fill(taken.begin(), taken.end(), 0);
      float total = 0.f;
      for (int64_t k = 0; k < top_k; ++k) {
        const int64_t e = best_left(choice.data(), E, taken);
        taken[e] = 1;
        id[t * top_k + k] = e;
        total += (w[t * top_k + k] = s[e]);
      }
      for (int64_t k = 0; k < top_k; ++k) {
        float v = w[t * top_k + k];
        if (norm) v = v / (total + 1e-20f);
        w[t * top_k + k] = v * static_cast<float>(scale);
      }
    }
  });
  return {scores, idx, weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(deepseek_moe, CPU, m) {
  m.impl("route_topk", &route_topk_cpu);
}

}  // namespace deepseek_moe
