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
  TORCH_CHECK(topk_idx_TK.dim() == 2 && topk_idx_TK.scalar_type() == at::kLong, "route_plan: int64 (T, K) expected");
  const c10::cuda::CUDAGuard guard(topk_idx_TK.device());
  const Tensor idx = topk_idx_TK.contiguous();
  const int64_t T = idx.size(0), K = idx.size(1), E = num_experts;
  const auto opts = idx.options();
  Tensor scratch = at::empty({E}, opts), flag = at::empty({1}, opts.dtype(at::kInt));
  Tensor counts = at::empty({E}, opts), offsets = at::empty({E + 1}, opts);
  Tensor pair = at::empty({T * K}, opts), token = at::empty({T * K}, opts), slot = at::empty({T, K}, opts);
  cuda::route_plan(idx.const_data_ptr<int64_t>(), T * K, K, E,
                   reinterpret_cast<unsigned long long*>(scratch.mutable_data_ptr<int64_t>()),
                   counts.mutable_data_ptr<int64_t>(), offsets.mutable_data_ptr<int64_t>(),
                   pair.mutable_data_ptr<int64_t>(), token.mutable_data_ptr<int64_t>(), slot.mutable_data_ptr<int64_t>(),
                   flag.mutable_data_ptr<int>(), c10::cuda::getCurrentCUDAStream());
  // A device-side assert instead of reading the flag on the host: no stream synchronisation.
  at::_assert_async(flag.eq(0).all(), "route_plan: expert ids must lie in [0, num_experts)");
  return {counts, offsets, pair, token, slot};
}

Tensor permute_cuda(const Tensor& x_in, const Tensor& token_in, const Tensor& slot_TK) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous(), token = token_in.contiguous();
  Tensor out = at::empty({token.size(0), x.size(1)}, x.options());
  cuda::permute(x.const_data_ptr(), token.const_data_ptr<int64_t>(), token.size(0), x.size(1),
                static_cast<int>(x.element_size()), out.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream());
  return out;
}

Tensor combine_cuda(const Tensor& o_in, const Tensor& slot_in, const std::optional<Tensor>& weight) {
  const c10::cuda::CUDAGuard guard(o_in.device());
  const Tensor o = o_in.contiguous(), slot = slot_in.contiguous();
  const Tensor w = weight.has_value() ? weight->to(at::toOpMathType(o.scalar_type())).contiguous() : Tensor();
  Tensor y = at::empty({slot.size(0), o.size(1)}, o.options());
  cuda::combine(dtype_of(o), o.const_data_ptr(), slot.const_data_ptr<int64_t>(), w.defined() ? w.const_data_ptr() : nullptr,
                o.size(0), slot.size(0), slot.size(1), o.size(1), y.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream());
  return y;
}

std::tuple<Tensor, Tensor> combine_backward_cuda(const Tensor& grad_y_in, const Tensor& o_in, const Tensor& slot_in,
                                                 const std::optional<Tensor>& weight) {
  const c10::cuda::CUDAGuard guard(o_in.device());
  const Tensor o = o_in.contiguous(), slot = slot_in.contiguous(), grad_y = grad_y_in.to(o.scalar_type()).contiguous();
  const auto acc = at::toOpMathType(o.scalar_type());
  const Tensor w = weight.has_value() ? weight->to(acc).contiguous() : Tensor();
  Tensor grad_o = at::zeros_like(o);
  Tensor grad_w = w.defined() ? at::empty(slot.sizes(), o.options().dtype(acc)) : Tensor();
  cuda::combine_backward(dtype_of(o), grad_y.const_data_ptr(), o.const_data_ptr(), slot.const_data_ptr<int64_t>(),
                         w.defined() ? w.const_data_ptr() : nullptr, o.size(0), slot.size(0), slot.size(1), o.size(1),
                         grad_o.mutable_data_ptr(), w.defined() ? grad_w.mutable_data_ptr() : nullptr,
                         c10::cuda::getCurrentCUDAStream());
  return {grad_o, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(deepseek_moe, CUDA, m) {
  m.impl("route_plan", &route_plan_cuda);
  m.impl("permute", &permute_cuda);
  m.impl("combine", &combine_cuda);
  m.impl("combine_backward", &combine_backward_cuda);
}

}  // namespace deepseek_moe
