// Binds the CUDA dispatch kernels (dispatch.cu) to the torch ops declared in ops.cpp. Built only in the CUDA
// build of the extension (DEEPSEEK_MOE_BUILD_EXT=1 with a CUDA torch and TORCH_CUDA_ARCH_LIST set).

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "dispatch_cuda.h"

namespace deepseek_moe {
namespace {

using at::Tensor;

cuda::DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kDouble: return cuda::DType::kFloat64;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "deepseek_moe CUDA ops: unsupported dtype ", t.scalar_type());
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> route_plan_cuda(const Tensor& topk_idx_TK, int64_t num_experts) {
  TORCH_CHECK(topk_idx_TK.dim() == 2 && topk_idx_TK.scalar_type() == at::kLong,
              "route_plan: topk_idx must be an int64 (T, K) tensor, got ", topk_idx_TK.scalar_type(), " ",
              topk_idx_TK.sizes());
  TORCH_CHECK(num_experts > 0 && num_experts < (int64_t(1) << 30), "route_plan: num_experts must be in [1, 2^30)");
  const c10::cuda::CUDAGuard guard(topk_idx_TK.device());
  const Tensor idx = topk_idx_TK.contiguous();
  const int64_t T = idx.size(0), K = idx.size(1), P = T * K, E = num_experts;
  TORCH_CHECK(P < (int64_t(1) << 31), "route_plan: at most 2^31 - 1 pairs, got ", P);
  const auto opts = idx.options();
  const size_t temp_bytes = cuda::route_plan_temp_bytes(P, E);
  Tensor counts_scratch = at::empty({E}, opts), flag = at::empty({1}, opts.dtype(at::kInt));
  Tensor keys_pairs = at::empty({4, P}, opts.dtype(at::kInt));
  Tensor temp = at::empty({static_cast<int64_t>(temp_bytes)}, opts.dtype(at::kByte));
  const cuda::RoutePlanScratch scratch{
      reinterpret_cast<unsigned long long*>(counts_scratch.mutable_data_ptr<int64_t>()),
      keys_pairs[0].mutable_data_ptr<int32_t>(), keys_pairs[1].mutable_data_ptr<int32_t>(),
      keys_pairs[2].mutable_data_ptr<int32_t>(), keys_pairs[3].mutable_data_ptr<int32_t>(),
      temp.mutable_data_ptr(), temp_bytes};
  Tensor counts = at::empty({E}, opts), offsets = at::empty({E + 1}, opts);
  Tensor pair = at::empty({P}, opts), token = at::empty({P}, opts), slot = at::empty({T, K}, opts);
  cuda::route_plan(idx.const_data_ptr<int64_t>(), P, K, E, scratch, counts.mutable_data_ptr<int64_t>(),
                   offsets.mutable_data_ptr<int64_t>(), pair.mutable_data_ptr<int64_t>(),
                   token.mutable_data_ptr<int64_t>(), slot.mutable_data_ptr<int64_t>(), flag.mutable_data_ptr<int>(),
                   c10::cuda::getCurrentCUDAStream());
  // A device-side assert instead of reading the flag on the host: no stream synchronisation.
  at::_assert_async(flag.eq(0).all(), "route_plan: expert ids must lie in [0, num_experts)");
  return {counts, offsets, pair, token, slot};
}

Tensor combine_cuda(const Tensor& o_in, const Tensor& slot_in, const std::optional<Tensor>& weight) {
  TORCH_CHECK(o_in.dim() == 2 && slot_in.dim() == 2 && slot_in.scalar_type() == at::kLong,
              "combine: expected o (N, H) and int64 slot (T, K)");
  const c10::cuda::CUDAGuard guard(o_in.device());
  const Tensor o = o_in.contiguous(), slot = slot_in.contiguous();
  if (weight.has_value()) TORCH_CHECK(weight->sizes() == slot.sizes(), "combine: weight must be (T, K) like slot");
  const Tensor w = weight.has_value() ? weight->to(at::toOpMathType(o.scalar_type())).contiguous() : Tensor();
  Tensor y = at::empty({slot.size(0), o.size(1)}, o.options());
  Tensor flag = at::empty({1}, o.options().dtype(at::kInt));
  cuda::combine(dtype_of(o), o.const_data_ptr(), slot.const_data_ptr<int64_t>(), w.defined() ? w.const_data_ptr() : nullptr,
                o.size(0), slot.size(0), slot.size(1), o.size(1), y.mutable_data_ptr(), flag.mutable_data_ptr<int>(),
                c10::cuda::getCurrentCUDAStream());
  at::_assert_async(flag.eq(0).all(), "combine: slots must lie in [0, N] (N marks a dropped pair)");
  return y;
}

std::tuple<Tensor, Tensor> combine_backward_cuda(const Tensor& grad_y_in, const Tensor& o_in, const Tensor& slot_in,
                                                 const std::optional<Tensor>& weight) {
  const c10::cuda::CUDAGuard guard(o_in.device());
  const Tensor o = o_in.contiguous(), slot = slot_in.contiguous(), grad_y = grad_y_in.to(o.scalar_type()).contiguous();
  TORCH_CHECK(grad_y.size(0) == slot.size(0) && grad_y.size(1) == o.size(1), "combine_backward: grad_y must be (T, H)");
  const auto acc = at::toOpMathType(o.scalar_type());
  const Tensor w = weight.has_value() ? weight->to(acc).contiguous() : Tensor();
  Tensor grad_o = at::zeros_like(o);
  Tensor grad_w = w.defined() ? at::empty(slot.sizes(), o.options().dtype(acc)) : Tensor();
  Tensor flag = at::empty({1}, o.options().dtype(at::kInt));
  cuda::combine_backward(dtype_of(o), grad_y.const_data_ptr(), o.const_data_ptr(), slot.const_data_ptr<int64_t>(),
                         w.defined() ? w.const_data_ptr() : nullptr, o.size(0), slot.size(0), slot.size(1), o.size(1),
                         grad_o.mutable_data_ptr(), w.defined() ? grad_w.mutable_data_ptr() : nullptr,
                         flag.mutable_data_ptr<int>(), c10::cuda::getCurrentCUDAStream());
  at::_assert_async(flag.eq(0).all(), "combine_backward: slots must lie in [0, N] (N marks a dropped pair)");
  return {grad_o, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(deepseek_moe, CUDA, m) {
  m.impl("route_plan", &route_plan_cuda);
  m.impl("combine", &combine_cuda);
  m.impl("combine_backward", &combine_backward_cuda);
}

}  // namespace deepseek_moe
