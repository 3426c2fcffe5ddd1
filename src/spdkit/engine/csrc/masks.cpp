// Stochastic masks m = g + (1 - g) r, r ~ U[0, 1), with r from a counter-based generator: r_i is
// a pure function of (key, offset + i), so the backward regenerates r instead of storing it, the
// state to checkpoint is two integers, and threads can fill any slice independently. One pass
// forward (no separate torch.rand + three elementwise ops over [B, C]) and one pass backward.
//
// Generator: SplitMix64 (Steele, Lea & Flood 2014) evaluated at counter i: the mix of
// key + (i + 1) * gamma; its top 24 bits give a float in [0, 1) exactly. spdkit/masks.py has the
// same function in torch ops (for CUDA and when this extension cannot be built); tests check the
// two agree bit for bit.
#include <torch/extension.h>

#include <cstdint>

namespace {
constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ULL;

inline float uniform_at(uint64_t key, uint64_t i) {
  uint64_t z = key + (i + 1) * kGamma;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) * 0x1p-24f;
}

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(),
              name, " must be a contiguous float32 CPU tensor");
}
}  // namespace

// r_i for i in [offset, offset + n), as a float32 tensor [n].
torch::Tensor mask_uniform(int64_t n, int64_t key, int64_t offset) {
  auto r = torch::empty({n}, torch::kFloat32);
  float* rp = r.data_ptr<float>();
  const uint64_t k = static_cast<uint64_t>(key), o = static_cast<uint64_t>(offset);
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; i++) rp[i] = uniform_at(k, o + i);
  return r;
}

// out[i] = f(in[i], r_i) over a float32 tensor, r_i the draws starting at offset.
template <typename F>
torch::Tensor map_with_uniform(const torch::Tensor& in, const char* name, int64_t key,
                               int64_t offset, F f) {
  check(in, name);
  auto out = torch::empty_like(in);
  const float* ip = in.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t n = in.numel();
  const uint64_t k = static_cast<uint64_t>(key), o = static_cast<uint64_t>(offset);
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; i++) op[i] = f(ip[i], uniform_at(k, o + i));
  return out;
}

// m = g + (1 - g) r with r the n = g.numel() draws starting at offset.
torch::Tensor mask_forward(torch::Tensor g, int64_t key, int64_t offset) {
  return map_with_uniform(g, "g", key, offset, [](float gi, float r) { return gi + (1.f - gi) * r; });
}

// dL/dg = dL/dm * (1 - r), the same r regenerated.
torch::Tensor mask_backward(torch::Tensor grad, int64_t key, int64_t offset) {
  return map_with_uniform(grad, "grad", key, offset, [](float gi, float r) { return gi * (1.f - r); });
}
