// The checks every CPU experts op makes on its inputs (segment_mlp.cpp; expert_gemv.cpp and expert_blocks.cpp through
// expert_segments.h), with the op's name in each message.
//
// Legend: T tokens, H hidden size, I expert hidden size, E experts, N sorted (token, slot) pairs.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

namespace deepseek_moe {

// x (T, H) on the CPU; gate_up (E, 2I, H), down (E, H, I) of x's dtype; token_N int64 (N,); weight_N (N,) in the
// accumulation dtype (fp32 for 16-bit x); counts_E (E,).
inline void check_expert_inputs(const char* op, const at::Tensor& x_TH, const at::Tensor& gate_up_EJH,
                                const at::Tensor& down_EHI, const at::Tensor& token_N, const at::Tensor& weight_N,
                                const at::Tensor& counts_E) {
  TORCH_CHECK(x_TH.device().is_cpu(), "deepseek_moe ext ", op, ": CPU tensors only, got ", x_TH.device());
  TORCH_CHECK(x_TH.dim() == 2 && gate_up_EJH.dim() == 3 && down_EHI.dim() == 3, op,
              ": expected x (T, H), gate_up (E, 2I, H), down (E, H, I)");
  const int64_t H = x_TH.size(1), E = gate_up_EJH.size(0), I = down_EHI.size(2);
  TORCH_CHECK(gate_up_EJH.size(1) == 2 * I && gate_up_EJH.size(2) == H && down_EHI.size(0) == E &&
                  down_EHI.size(1) == H,
              op, ": weight shapes ", gate_up_EJH.sizes(), " and ", down_EHI.sizes(), " do not match H=", H);
  TORCH_CHECK(gate_up_EJH.scalar_type() == x_TH.scalar_type() && down_EHI.scalar_type() == x_TH.scalar_type(), op,
              ": x and the weights must share one dtype");
  TORCH_CHECK(token_N.scalar_type() == at::kLong && token_N.dim() == 1, op, ": token_N must be int64 (N,)");
  TORCH_CHECK(weight_N.dim() == 1 && weight_N.size(0) == token_N.size(0), op, ": weight_N must be (N,)");
  TORCH_CHECK(weight_N.scalar_type() == at::toOpMathType(x_TH.scalar_type()), op,
              ": weight_N must be in the accumulation dtype ", at::toOpMathType(x_TH.scalar_type()));
  TORCH_CHECK(counts_E.dim() == 1 && counts_E.size(0) == E, op, ": counts_E must be (E,)");
}

}  // namespace deepseek_moe
