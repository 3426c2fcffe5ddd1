// Fused causal-importance MLPs on the CPU: forward and backward in one pass over [B, C, d_gate],
// never materialising the [B, C, d_gate] hidden layer. Same arithmetic as the eager
//   raw[b,c] = b_out[c] + sum_d w_out[c,d] * GELU(w_in[c,d] * h[b,c] + b_in[c,d])
// (exact erf GELU). The forward also applies both leaky hard sigmoids (lower: 0.01x below 0;
// upper: 1 + 0.01(x-1) above 1) and the backward takes both outputs' gradients, so the sigmoid
// work costs no extra pass over [B, C].
//
// Layout of the work: threads split the C subcomponents (so parameter gradients need no
// cross-thread reduction); each thread walks the batch in blocks of kLanes rows, vectorised
// over those rows (one SIMD register), looping over d_gate inside. Per-lane partial sums of the
// parameter gradients are reduced once per subcomponent at the end.
#include <torch/extension.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {
constexpr float kSqrt1_2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;
constexpr float kLeak = 0.01f;
constexpr int64_t kLanes = 16;

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(),
              name, " must be a contiguous float32 CPU tensor");
}
}  // namespace

// h [..., C]; w_in, b_in, w_out [C, D]; b_out [C] -> {lower, upper, raw}, each shaped like h.
std::vector<torch::Tensor> ci_forward(torch::Tensor h, torch::Tensor w_in, torch::Tensor b_in,
                                      torch::Tensor w_out, torch::Tensor b_out) {
  check(h, "h"); check(w_in, "w_in"); check(b_in, "b_in"); check(w_out, "w_out"); check(b_out, "b_out");
  const int64_t C = w_in.size(0), D = w_in.size(1);
  const int64_t rows = h.numel() / C;
  auto raw = torch::empty_like(h), lower = torch::empty_like(h), upper = torch::empty_like(h);
  const float *hp = h.data_ptr<float>(), *wi = w_in.data_ptr<float>(), *bi = b_in.data_ptr<float>();
  const float *wo = w_out.data_ptr<float>(), *bo = b_out.data_ptr<float>();
  float *rp = raw.data_ptr<float>(), *lp = lower.data_ptr<float>(), *up = upper.data_ptr<float>();
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < C; c++) {
    const float *wic = wi + c * D, *bic = bi + c * D, *woc = wo + c * D;
    for (int64_t b0 = 0; b0 < rows; b0 += kLanes) {
      const int64_t n = std::min(kLanes, rows - b0);
      float x[kLanes], acc[kLanes];
      for (int64_t j = 0; j < kLanes; j++) {
        x[j] = j < n ? hp[(b0 + j) * C + c] : 0.f;
        acc[j] = 0.f;
      }
      for (int64_t d = 0; d < D; d++) {
        const float w = wic[d], bb = bic[d], o = woc[d];
#pragma omp simd
        for (int64_t j = 0; j < kLanes; j++) {
          const float z = w * x[j] + bb;
          acc[j] += o * (0.5f * z * (1.f + erff(z * kSqrt1_2)));
        }
      }
      for (int64_t j = 0; j < n; j++) {
        const float y = acc[j] + bo[c];
        const int64_t i = (b0 + j) * C + c;
        rp[i] = y;
        lp[i] = y < 0.f ? kLeak * y : (y > 1.f ? 1.f : y);
        up[i] = y > 1.f ? 1.f + kLeak * (y - 1.f) : (y < 0.f ? 0.f : y);
      }
    }
  }
  return {lower, upper, raw};
}

// Gradients of (lower, upper) -> {g_h, g_w_in, g_b_in, g_w_out, g_b_out}.
std::vector<torch::Tensor> ci_backward(torch::Tensor g_lower, torch::Tensor g_upper,
                                       torch::Tensor raw, torch::Tensor h, torch::Tensor w_in,
                                       torch::Tensor b_in, torch::Tensor w_out) {
  check(g_lower, "g_lower"); check(g_upper, "g_upper"); check(raw, "raw"); check(h, "h");
  const int64_t C = w_in.size(0), D = w_in.size(1);
  const int64_t rows = h.numel() / C;
  auto g_h = torch::empty_like(h);
  auto g_w_in = torch::empty_like(w_in), g_b_in = torch::empty_like(b_in);
  auto g_w_out = torch::empty_like(w_out), g_b_out = torch::empty({C}, w_in.options());
  const float *glp = g_lower.data_ptr<float>(), *gup = g_upper.data_ptr<float>();
  const float *rp = raw.data_ptr<float>(), *hp = h.data_ptr<float>();
  const float *wi = w_in.data_ptr<float>(), *bi = b_in.data_ptr<float>(), *wo = w_out.data_ptr<float>();
  float *ghp = g_h.data_ptr<float>(), *gwi = g_w_in.data_ptr<float>(), *gbi = g_b_in.data_ptr<float>();
  float *gwo = g_w_out.data_ptr<float>(), *gbo = g_b_out.data_ptr<float>();
#pragma omp parallel
  {
    std::vector<float> acc(3 * D * kLanes);  // per-lane partial sums: w_in, b_in, w_out grads
#pragma omp for schedule(static)
    for (int64_t c = 0; c < C; c++) {
      const float *wic = wi + c * D, *bic = bi + c * D, *woc = wo + c * D;
      float *awi = acc.data(), *abi = awi + D * kLanes, *awo = abi + D * kLanes;
      std::fill(acc.begin(), acc.end(), 0.f);
      float g_bias = 0.f;
      for (int64_t b0 = 0; b0 < rows; b0 += kLanes) {
        const int64_t n = std::min(kLanes, rows - b0);
        float x[kLanes], g[kLanes], gx[kLanes];
        for (int64_t j = 0; j < kLanes; j++) {
          gx[j] = 0.f;
          if (j >= n) { x[j] = 0.f; g[j] = 0.f; continue; }
          const int64_t i = (b0 + j) * C + c;
          const float y = rp[i];
          // d lower/dy: 0.01 below 0, 1 on [0, 1], 0 above; d upper/dy: 0, 1, 0.01
          x[j] = hp[i];
          g[j] = glp[i] * (y < 0.f ? kLeak : (y > 1.f ? 0.f : 1.f)) +
                 gup[i] * (y < 0.f ? 0.f : (y > 1.f ? kLeak : 1.f));
          g_bias += g[j];
        }
        for (int64_t d = 0; d < D; d++) {
          const float w = wic[d], bb = bic[d], o = woc[d];
          float *awid = awi + d * kLanes, *abid = abi + d * kLanes, *awod = awo + d * kLanes;
#pragma omp simd
          for (int64_t j = 0; j < kLanes; j++) {
            const float z = w * x[j] + bb;
            const float cdf = 0.5f * (1.f + erff(z * kSqrt1_2));
            const float pdf = expf(-0.5f * z * z) * kInvSqrt2Pi;
            const float gz = g[j] * o * (cdf + z * pdf);
            awod[j] += g[j] * z * cdf;
            abid[j] += gz;
            awid[j] += gz * x[j];
            gx[j] += gz * w;
          }
        }
        for (int64_t j = 0; j < n; j++) ghp[(b0 + j) * C + c] = gx[j];
      }
      for (int64_t d = 0; d < D; d++) {
        float s_wi = 0.f, s_bi = 0.f, s_wo = 0.f;
        for (int64_t j = 0; j < kLanes; j++) {
          s_wi += awi[d * kLanes + j];
          s_bi += abi[d * kLanes + j];
          s_wo += awo[d * kLanes + j];
        }
        gwi[c * D + d] = s_wi;
        gbi[c * D + d] = s_bi;
        gwo[c * D + d] = s_wo;
      }
      gbo[c] = g_bias;
    }
  }
  return {g_h, g_w_in, g_b_in, g_w_out, g_b_out};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &ci_forward, "fused CI MLP + leaky hard sigmoids, forward");
  m.def("backward", &ci_backward, "fused CI MLP + leaky hard sigmoids, backward");
}
