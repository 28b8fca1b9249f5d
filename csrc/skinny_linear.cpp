// y = x @ W^T + b for a few rows of x: the matmuls of a CPU decode step (eval.py builds this on first use).
//
// Why: a decode step multiplies 16-ish rows by every weight matrix. MKL's sgemm packs the weight for each
// call and runs at 40-60 GFLOP/s at that shape on a 2-core AMD EPYC, a third of its large-matmul rate; this
// loop reads each weight once, in place, and runs near that rate (benchmarks/bench_generate.py).
//
// How: x is transposed into xt, one 16-wide vector per input feature k holding 16 rows of x. A block of R
// weight rows then accumulates acc[j] += W[n+j, k] * xt[k] over k: one broadcast and one vector FMA per
// weight entry, R rows of W streamed side by side, x read from cache. Up to 32 rows of x go through one
// pass over W (two vectors per k); more rows take more passes. Each output row's sum runs over k in the
// same order whatever the other rows are, so a row's result does not depend on the batch it is in.
#include <torch/extension.h>
#include <ATen/Parallel.h>

typedef float vec16 __attribute__((vector_size(64)));  // 16 floats: one AVX-512 register, two AVX2 ones

// Rows n..n+R-1 of y (transposed back on store) from R rows of W and V vectors of 16 rows of x per k.
template <int R, int V>
static inline void weight_rows(const float* w, const float* bias, const vec16* xt, float* y, int64_t n,
                               int64_t K, int64_t M, int64_t N) {
  vec16 acc[R][V] = {};
  const float* wr[R];
  for (int j = 0; j < R; ++j) wr[j] = w + (n + j) * K;
  for (int64_t k = 0; k < K; ++k) {
    vec16 xk[V];
    for (int v = 0; v < V; ++v) xk[v] = xt[k * V + v];
    for (int j = 0; j < R; ++j) {
      float wjk = wr[j][k];
      for (int v = 0; v < V; ++v) acc[j][v] += wjk * xk[v];
    }
  }
  // through a buffer: indexing acc by a runtime row would keep it in memory instead of registers
  alignas(64) float out[R][V * 16];
  for (int j = 0; j < R; ++j)
    for (int v = 0; v < V; ++v) *reinterpret_cast<vec16*>(&out[j][v * 16]) = acc[j][v];
  for (int64_t m = 0; m < M; ++m)
    for (int j = 0; j < R; ++j) y[m * N + n + j] = out[j][m] + (bias ? bias[n + j] : 0.f);
}

// M <= 16 * V rows of x [M, K] against all of W [N, K] into y [M, N] (row stride N).
template <int V>
static void one_pass(const float* x, const float* w, const float* bias, float* y, int64_t M, int64_t K, int64_t N) {
  std::vector<vec16> xt(K * V);  // zero rows past M: their lanes compute zeros that are never stored
  float* xt_f = reinterpret_cast<float*>(xt.data());
  for (int64_t k = 0; k < K; ++k)
    for (int64_t m = 0; m < V * 16; ++m) xt_f[k * V * 16 + m] = m < M ? x[m * K + k] : 0.f;
  constexpr int R = 8;  // 8 x V accumulators: registers to spare, enough weight streams to hide latency
  at::parallel_for(0, N / R, 8, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) weight_rows<R, V>(w, bias, xt.data(), y, block * R, K, M, N);
  });
  for (int64_t n = N / R * R; n < N; ++n) weight_rows<1, V>(w, bias, xt.data(), y, n, K, M, N);
}

torch::Tensor skinny_linear(torch::Tensor x, torch::Tensor weight, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "skinny_linear: x [M, K], weight [N, K]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && weight.scalar_type() == torch::kFloat32, "skinny_linear: float32 only");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "skinny_linear: CPU tensors only");
  x = x.contiguous();
  weight = weight.contiguous();
  torch::Tensor b = bias.has_value() ? bias->contiguous() : torch::Tensor();
  int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  torch::Tensor y = torch::empty({M, N}, x.options());
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  for (int64_t m0 = 0; m0 < M; m0 += 32) {
    int64_t rows = std::min<int64_t>(32, M - m0);
    const float* xp = x.data_ptr<float>() + m0 * K;
    float* yp = y.data_ptr<float>() + m0 * N;
    if (rows > 16) one_pass<2>(xp, weight.data_ptr<float>(), bp, yp, rows, K, N);
    else one_pass<1>(xp, weight.data_ptr<float>(), bp, yp, rows, K, N);
  }
  return y;
}

// A torch operator (torch.ops.agrl.skinny_linear): it shows by name in torch.profiler tables.
TORCH_LIBRARY(agrl, m) { m.def("skinny_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor"); }
TORCH_LIBRARY_IMPL(agrl, CPU, m) { m.impl("skinny_linear", &skinny_linear); }
