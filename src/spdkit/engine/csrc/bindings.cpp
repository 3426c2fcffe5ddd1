// The Python module of spdkit's CPU kernels (spdkit/kernels.py builds it on first use).
#include <torch/extension.h>

#include <vector>

std::vector<torch::Tensor> ci_forward(torch::Tensor h, torch::Tensor w_in, torch::Tensor b_in,
                                      torch::Tensor w_out, torch::Tensor b_out);
std::vector<torch::Tensor> ci_backward(torch::Tensor g_lower, torch::Tensor g_upper,
                                       torch::Tensor raw, torch::Tensor h, torch::Tensor w_in,
                                       torch::Tensor b_in, torch::Tensor w_out);
std::vector<torch::Tensor> ci_backward_raw(torch::Tensor g_raw, torch::Tensor h,
                                           torch::Tensor w_in, torch::Tensor b_in,
                                           torch::Tensor w_out);
torch::Tensor mask_uniform(int64_t n, int64_t key, int64_t offset);
torch::Tensor mask_forward(torch::Tensor g, int64_t key, int64_t offset);
torch::Tensor mask_backward(torch::Tensor grad, int64_t key, int64_t offset);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &ci_forward, "fused CI MLP + leaky hard sigmoids, forward");
  m.def("backward", &ci_backward, "fused CI MLP + leaky hard sigmoids, backward");
  m.def("backward_raw", &ci_backward_raw, "fused CI MLP, backward from the raw CI's gradient");
  m.def("mask_uniform", &mask_uniform, "counter-based U[0, 1) draws [offset, offset + n)");
  m.def("mask_forward", &mask_forward, "stochastic mask g + (1 - g) r, forward");
  m.def("mask_backward", &mask_backward, "stochastic mask, backward: grad * (1 - r)");
}
