// Fused causal-importance MLPs on the CPU: forward and backward in one pass over [B, C, d_gate],
// never materialising the [B, C, d_gate] hidden layer. Same function as the eager
//   raw[b,c] = b_out[c] + sum_d w_out[c,d] * GELU(w_in[c,d] * h[b,c] + b_in[c,d])
// (erf GELU; erf and exp by inline approximations accurate to a few float ulps, see fast_erf and
// normal_cdf_pdf). The forward also applies both leaky hard sigmoids (lower: 0.01x below 0;
// upper: 1 + 0.01(x-1) above 1) and the backward takes both outputs' gradients, so the sigmoid
// work costs no extra pass over [B, C].
//
// Exact zeros in h are common: a row of h is zero wherever the module's input is, and sparse-
// feature inputs are all zero in 0.95^5 = 77% of TMS 5-2 rows and 0.99^100 = 37% of residual-MLP
// rows (ReLU outputs add more). Every zero h_c gives the same MLP value. Each (chunk, c) packs
// its nonzero entries into lane blocks and gives the zeros the value computed once per c by the
// same lane code; in the backward their gradients are that value's gradients times the sum of
// their incoming gradients. The same arithmetic up to float summation order.
//
// Layout of the work: threads split the rows (batch x positions) into contiguous chunks, never
// the C columns: a row of h is C floats, so splitting columns made threads write into the same
// cache lines (false sharing: docs/benchmarks.md). Inside a chunk, each subcomponent walks its
// packed nonzero entries in blocks of kLanes, vectorised over them, looping over d_gate inside.
// The backward's parameter gradients are summed per lane, then per chunk, then over chunks in a
// fixed order: the result does not depend on the number of threads.
#include <torch/extension.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {
constexpr float kSqrt1_2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;
constexpr float kLeak = 0.01f;
constexpr int64_t kLanes = 32;
constexpr int64_t kChunkRows = 256;  // rows per chunk of work (a multiple of kLanes)

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(),
              name, " must be a contiguous float32 CPU tensor");
}

// erf(x) as x P(x^2) / Q(x^2) on [-4, 4] (erf(±4) = ±1 to within 2e-8 beyond). Max abs error
// 3.3e-7 against double erf; half the cost of glibc's vector erff here, and it inlines into the
// SIMD loops (pure FMAs, one division). Coefficients: the float minimax fit used by Eigen.
inline float fast_erf(float x) {
  x = std::min(4.f, std::max(-4.f, x));
  const float x2 = x * x;
  float p = -2.72614225801306e-10f;
  p = p * x2 + 2.77068142495902e-08f;
  p = p * x2 - 2.10102402082508e-06f;
  p = p * x2 - 5.69250639462346e-05f;
  p = p * x2 - 7.34990630326855e-04f;
  p = p * x2 - 2.95459980854025e-03f;
  p = p * x2 - 1.60960333262415e-02f;
  float q = -1.45660718464996e-05f;
  q = q * x2 - 2.13374055278905e-04f;
  q = q * x2 - 1.68282697438203e-03f;
  q = q * x2 - 7.37332916720468e-03f;
  q = q * x2 - 1.42647390514189e-02f;
  return x * p / q;
}

// exp(x) for x <= 0 (the Gaussian density's exponent): 2^n * e^r with n = round(x / ln 2),
// r = x - n ln 2 in [-ln2/2, ln2/2] (ln 2 split in two for exactness), e^r by its degree-6 Taylor
// polynomial (relative error < 3e-7), 2^n built in the exponent bits. Inlined: a call to the
// vector library's expf inside the loop made the compiler spill every live SIMD register.
inline float fast_exp_nonpos(float x) {
  x = std::max(x, -87.f);  // below, e^x underflows float anyway
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// The standard normal CDF Phi(z) and density phi(z), sharing one exp, for the backward: Phi by
// erfc's A&S 7.1.26 form t P(t) exp(-u^2) with u = |z|/sqrt(2), t = 1/(1 + 0.3275911 u) (max abs
// error 2.5e-7 on Phi; for z < 0 it has no cancellation) and phi = exp(-u^2)/sqrt(2 pi). One exp
// and one division instead of fast_erf's 12 FMAs plus an exp: a quarter off the backward.
inline void normal_cdf_pdf(float z, float& cdf, float& pdf) {
  const float u = std::fabs(z) * kSqrt1_2;
  const float e = fast_exp_nonpos(-u * u);
  const float t = 1.f / (1.f + 0.3275911f * u);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const float half_erfc = 0.5f * t * p * e;
  cdf = z < 0.f ? half_erfc : 1.f - half_erfc;
  pdf = e * kInvSqrt2Pi;
}

// Sum over d of w_out * GELU(w_in * x + b_in) for kLanes values x of one column (no b_out).
inline void mlp_lanes(const float* x, const float* wic, const float* bic, const float* woc,
                      int64_t D, float* acc) {
  for (int64_t j = 0; j < kLanes; j++) acc[j] = 0.f;
  for (int64_t d = 0; d < D; d++) {
    const float w = wic[d], bb = bic[d], o = woc[d];
#pragma omp simd
    for (int64_t j = 0; j < kLanes; j++) {
      const float z = w * x[j] + bb;
      acc[j] += o * (0.5f * z * (1.f + fast_erf(z * kSqrt1_2)));
    }
  }
}

// Backward of mlp_lanes for incoming gradients g: adds per-lane parameter gradients into awi,
// abi, awo ([D][kLanes] each) and writes the input gradient of each lane into gx.
inline void mlp_lanes_backward(const float* x, const float* g, const float* wic, const float* bic,
                               const float* woc, int64_t D, float* awi, float* abi, float* awo,
                               float* gx) {
  for (int64_t j = 0; j < kLanes; j++) gx[j] = 0.f;
  for (int64_t d = 0; d < D; d++) {
    const float w = wic[d], bb = bic[d], o = woc[d];
    float *awid = awi + d * kLanes, *abid = abi + d * kLanes, *awod = awo + d * kLanes;
#pragma omp simd
    for (int64_t j = 0; j < kLanes; j++) {
      const float z = w * x[j] + bb;
      float cdf, pdf;
      normal_cdf_pdf(z, cdf, pdf);
      const float gz = g[j] * o * (cdf + z * pdf);
      awod[j] += g[j] * z * cdf;
      abid[j] += gz;
      awid[j] += gz * x[j];
      gx[j] += gz * w;
    }
  }
}

// d lower/dy: 0.01 below 0, 1 on [0, 1], 0 above; d upper/dy: 0, 1, 0.01.
inline float sigmoids_backward(float y, float g_lower, float g_upper) {
  return g_lower * (y < 0.f ? kLeak : (y > 1.f ? 0.f : 1.f)) +
         g_upper * (y < 0.f ? 0.f : (y > 1.f ? kLeak : 1.f));
}
}  // namespace

// h [..., C]; w_in, b_in, w_out [C, D]; b_out [C] -> {lower, upper, raw}, each shaped like h.
std::vector<torch::Tensor> ci_forward(torch::Tensor h, torch::Tensor w_in, torch::Tensor b_in,
                                      torch::Tensor w_out, torch::Tensor b_out) {
  check(h, "h"); check(w_in, "w_in"); check(b_in, "b_in"); check(w_out, "w_out"); check(b_out, "b_out");
  const int64_t C = w_in.size(0), D = w_in.size(1);
  const int64_t rows = h.numel() / C;
  const int64_t n_chunks = (rows + kChunkRows - 1) / kChunkRows;
  auto raw = torch::empty_like(h), lower = torch::empty_like(h), upper = torch::empty_like(h);
  const float *hp = h.data_ptr<float>(), *wi = w_in.data_ptr<float>(), *bi = b_in.data_ptr<float>();
  const float *wo = w_out.data_ptr<float>(), *bo = b_out.data_ptr<float>();
  float *rp = raw.data_ptr<float>(), *lp = lower.data_ptr<float>(), *up = upper.data_ptr<float>();
  // the raw CI at h = 0, by the same lane code as every other value
  std::vector<float> raw0(C);
  for (int64_t c = 0; c < C; c++) {
    float x[kLanes] = {}, acc[kLanes];
    mlp_lanes(x, wi + c * D, bi + c * D, wo + c * D, D, acc);
    raw0[c] = acc[0] + bo[c];
  }
  auto write = [&](int64_t i, float y) {
    rp[i] = y;
    lp[i] = y < 0.f ? kLeak * y : (y > 1.f ? 1.f : y);
    up[i] = y > 1.f ? 1.f + kLeak * (y - 1.f) : (y < 0.f ? 0.f : y);
  };
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < n_chunks; k++) {
    const int64_t r0 = k * kChunkRows, r1 = std::min(rows, r0 + kChunkRows);
    int64_t idx[kChunkRows];
    float xs[kChunkRows + kLanes];
    for (int64_t c = 0; c < C; c++) {
      int64_t n = 0;  // nonzero entries of column c in this chunk, packed
      for (int64_t b = r0; b < r1; b++) {
        const float v = hp[b * C + c];
        if (v != 0.f) {
          idx[n] = b * C + c;
          xs[n++] = v;
        } else {
          write(b * C + c, raw0[c]);
        }
      }
      std::fill(xs + n, xs + n + kLanes, 0.f);
      for (int64_t b0 = 0; b0 < n; b0 += kLanes) {
        float acc[kLanes];
        mlp_lanes(xs + b0, wi + c * D, bi + c * D, wo + c * D, D, acc);
        for (int64_t j = 0; j < std::min(kLanes, n - b0); j++) write(idx[b0 + j], acc[j] + bo[c]);
      }
    }
  }
  return {lower, upper, raw};
}

namespace {
// The MLPs' backward for any incoming gradient d loss / d raw at flat index i, `grad_at(i)`
// -> {g_h, g_w_in, g_b_in, g_w_out, g_b_out}.
template <typename GradAt>
std::vector<torch::Tensor> mlp_backward(GradAt grad_at, torch::Tensor h, torch::Tensor w_in,
                                        torch::Tensor b_in, torch::Tensor w_out) {
  const int64_t C = w_in.size(0), D = w_in.size(1);
  const int64_t rows = h.numel() / C;
  const int64_t n_chunks = (rows + kChunkRows - 1) / kChunkRows;
  const int64_t per_chunk = C * (3 * D + 1);  // w_in, b_in, w_out grads [C, D] each, b_out [C]
  auto g_h = torch::empty_like(h);
  auto partial = torch::empty({n_chunks, per_chunk}, w_in.options());
  const float *hp = h.data_ptr<float>();
  const float *wi = w_in.data_ptr<float>(), *bi = b_in.data_ptr<float>(), *wo = w_out.data_ptr<float>();
  float *ghp = g_h.data_ptr<float>(), *pp = partial.data_ptr<float>();
  // Gradients at h = 0 per unit incoming gradient, by the same lane code (lane 0, g = 1):
  // z = b_in there, so d raw / d w_in is 0 and the rest is a constant per (c, d).
  std::vector<float> zero_wo(C * D), zero_bi(C * D), zero_h(C);
  for (int64_t c = 0; c < C; c++) {
    float x[kLanes] = {}, g[kLanes] = {1.f}, gx[kLanes];
    std::vector<float> a(3 * D * kLanes, 0.f);
    float *awi = a.data(), *abi = awi + D * kLanes, *awo = abi + D * kLanes;
    mlp_lanes_backward(x, g, wi + c * D, bi + c * D, wo + c * D, D, awi, abi, awo, gx);
    for (int64_t d = 0; d < D; d++) {
      zero_wo[c * D + d] = awo[d * kLanes];
      zero_bi[c * D + d] = abi[d * kLanes];
    }
    zero_h[c] = gx[0];
  }
#pragma omp parallel
  {
    std::vector<float> acc(3 * D * kLanes);  // per-lane partial sums: w_in, b_in, w_out grads
#pragma omp for schedule(static)
    for (int64_t k = 0; k < n_chunks; k++) {
      const int64_t r0 = k * kChunkRows, r1 = std::min(rows, r0 + kChunkRows);
      float *pwi = pp + k * per_chunk, *pbi = pwi + C * D, *pwo = pbi + C * D, *pbo = pwo + C * D;
      int64_t idx[kChunkRows];
      float xs[kChunkRows + kLanes], gs[kChunkRows + kLanes];
      for (int64_t c = 0; c < C; c++) {
        const float *wic = wi + c * D, *bic = bi + c * D, *woc = wo + c * D;
        float *awi = acc.data(), *abi = awi + D * kLanes, *awo = abi + D * kLanes;
        std::fill(acc.begin(), acc.end(), 0.f);
        float g_bias = 0.f, g_zero = 0.f;  // all incoming gradients; those of the zero inputs
        int64_t n = 0;
        for (int64_t b = r0; b < r1; b++) {
          const int64_t i = b * C + c;
          const float g = grad_at(i);
          g_bias += g;
          if (hp[i] != 0.f) {
            idx[n] = i;
            xs[n] = hp[i];
            gs[n++] = g;
          } else {
            g_zero += g;
            ghp[i] = g * zero_h[c];
          }
        }
        std::fill(xs + n, xs + n + kLanes, 0.f);
        std::fill(gs + n, gs + n + kLanes, 0.f);  // padded lanes add nothing
        for (int64_t b0 = 0; b0 < n; b0 += kLanes) {
          float gx[kLanes];
          mlp_lanes_backward(xs + b0, gs + b0, wic, bic, woc, D, awi, abi, awo, gx);
          for (int64_t j = 0; j < std::min(kLanes, n - b0); j++) ghp[idx[b0 + j]] = gx[j];
        }
        for (int64_t d = 0; d < D; d++) {
          float s_wi = 0.f, s_bi = 0.f, s_wo = 0.f;
          for (int64_t j = 0; j < kLanes; j++) {
            s_wi += awi[d * kLanes + j];
            s_bi += abi[d * kLanes + j];
            s_wo += awo[d * kLanes + j];
          }
          pwi[c * D + d] = s_wi;
          pbi[c * D + d] = s_bi + g_zero * zero_bi[c * D + d];
          pwo[c * D + d] = s_wo + g_zero * zero_wo[c * D + d];
        }
        pbo[c] = g_bias;
      }
    }
  }
  // Sum the chunks' partial gradients in chunk order (deterministic for any thread count).
  auto grads = torch::empty({per_chunk}, w_in.options());
  float* gp = grads.data_ptr<float>();
#pragma omp parallel for schedule(static)
  for (int64_t e = 0; e < per_chunk; e++) {
    float s = 0.f;
    for (int64_t k = 0; k < n_chunks; k++) s += pp[k * per_chunk + e];
    gp[e] = s;
  }
  auto g_w_in = grads.narrow(0, 0, C * D).view({C, D});
  auto g_b_in = grads.narrow(0, C * D, C * D).view({C, D});
  auto g_w_out = grads.narrow(0, 2 * C * D, C * D).view({C, D});
  auto g_b_out = grads.narrow(0, 3 * C * D, C);
  return {g_h, g_w_in, g_b_in, g_w_out, g_b_out};
}
}  // namespace

// Gradients of (lower, upper) -> {g_h, g_w_in, g_b_in, g_w_out, g_b_out}.
std::vector<torch::Tensor> ci_backward(torch::Tensor g_lower, torch::Tensor g_upper,
                                       torch::Tensor raw, torch::Tensor h, torch::Tensor w_in,
                                       torch::Tensor b_in, torch::Tensor w_out) {
  check(g_lower, "g_lower"); check(g_upper, "g_upper"); check(raw, "raw"); check(h, "h");
  const float *glp = g_lower.data_ptr<float>(), *gup = g_upper.data_ptr<float>();
  const float* rp = raw.data_ptr<float>();
  return mlp_backward([=](int64_t i) { return sigmoids_backward(rp[i], glp[i], gup[i]); }, h,
                      w_in, b_in, w_out);
}

// Gradient of the raw CI (for lower sigmoids applied outside the kernel) -> the same five.
std::vector<torch::Tensor> ci_backward_raw(torch::Tensor g_raw, torch::Tensor h,
                                           torch::Tensor w_in, torch::Tensor b_in,
                                           torch::Tensor w_out) {
  check(g_raw, "g_raw"); check(h, "h");
  const float* grp = g_raw.data_ptr<float>();
  return mlp_backward([=](int64_t i) { return grp[i]; }, h, w_in, b_in, w_out);
}
