// The CPU decode step, as torch operators (torch.ops.agrl.*; cpu_decode.py builds this file on first use and
// falls back to plain torch where it cannot). All are float32 and equal to the torch arithmetic up to
// rounding (tests/test_generation.py); each row's sums run in the same order whatever batch the row is in.
//
// skinny_linear: y = x @ W^T + b for a few rows of x. A decode step multiplies 16-ish rows by every weight
// matrix; MKL's sgemm packs the weight on each call and runs far below its large-matmul rate at that shape
// (the measurements: benchmarks/README.md). Here x is transposed into xt, one 16-wide vector per input
// feature k holding 16 rows of x, and a block of R weight rows accumulates acc[j] += W[n+j, k] * xt[k]
// over k: one broadcast and one vector FMA per weight entry, R rows of W streamed side by side, x read
// from cache. Up to 32 rows of x go through one pass over W (two vectors per k); more take more passes.
//
// grouped_attention: one new query per row against its prompt's keys (stored once for the prompt's group of
// rows, cpu_decode.GroupedKV) and its own generated keys. For a (prompt, KV head) pair, the group's query heads
// (group x heads-per-KV-head of them) sit side by side in the 16 lanes of a vector, so the prompt's keys
// and values are streamed once for all of them, with the same broadcast-FMA loop as skinny_linear.
//
// decode_layer: a whole Llama-family decoder layer (cpu_decode.decode_step's loop body) in one call, the two
// above plus the norms, rotary, SiLU and residual adds between them. gumbel_sample: rollouts._sample at top-p 1.
#include <torch/extension.h>
#include <ATen/Parallel.h>

typedef float vec16 __attribute__((vector_size(64)));  // 16 floats: one AVX-512 register, two AVX2 ones
typedef float vec16u __attribute__((vector_size(64), aligned(4)));  // the same, at any float's address
typedef int32_t int16v __attribute__((vector_size(64)));

static const float* ptr(const torch::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }  // optional tensors

// ---------------------------------------------------------------------------------------------------
// skinny_linear
// ---------------------------------------------------------------------------------------------------

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

// y [M, N] = x [M, K] @ w [N, K]^T (+ b), 32 rows of x per pass over w.
static void linear_rows(const float* x, const float* w, const float* b, float* y, int64_t M, int64_t K, int64_t N) {
  for (int64_t m0 = 0; m0 < M; m0 += 32) {
    int64_t rows = std::min<int64_t>(32, M - m0);
    if (rows > 16) one_pass<2>(x + m0 * K, w, b, y + m0 * N, rows, K, N);
    else one_pass<1>(x + m0 * K, w, b, y + m0 * N, rows, K, N);
  }
}

torch::Tensor skinny_linear(torch::Tensor x, torch::Tensor weight, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "skinny_linear: x [M, K], weight [N, K]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && weight.scalar_type() == torch::kFloat32, "skinny_linear: float32 only");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "skinny_linear: CPU tensors only");
  x = x.contiguous();
  weight = weight.contiguous();
  torch::Tensor b = bias.has_value() ? bias->contiguous() : torch::Tensor();
  torch::Tensor y = torch::empty({x.size(0), weight.size(0)}, x.options());
  linear_rows(x.data_ptr<float>(), weight.data_ptr<float>(), ptr(b), y.data_ptr<float>(), x.size(0), x.size(1), weight.size(0));
  return y;
}

// ---------------------------------------------------------------------------------------------------
// grouped_attention
// ---------------------------------------------------------------------------------------------------
// e^x for each lane (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-7 polynomial in r, times 2^n;
// within 2 ulp of expf). Lanes below -87.3 (e^x under float's normal range, and -inf) give 0.
static inline vec16 exp16(vec16 x) {
  vec16 z = x * 1.44269504088896341f;
  vec16 n = (z + 12582912.0f) - 12582912.0f;  // round to nearest: adding 1.5 * 2^23 drops the fraction
  vec16 r = x - n * 0.693359375f - n * -2.12194440e-4f;  // ln2 in two parts, so r keeps its low bits
  vec16 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int16v bits = (__builtin_convertvector(n, int16v) + 127) << 23;  // 2^n as a float's exponent field
  vec16 out = p * reinterpret_cast<vec16&>(bits);
  vec16 zero = {};
  return x < -87.3f ? zero : out;
}

typedef float vec8 __attribute__((vector_size(32)));
typedef float vec4 __attribute__((vector_size(16)));

constexpr int64_t AHEAD = 32;  // rows of keys and values grouped_attention prefetches ahead of its loops

static inline float sum16(vec16 v) {  // by halves: a few shuffles instead of 15 dependent scalar adds
  vec8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  vec4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// q [rows, heads, D]; prompt_k/v [prompts, kv_heads, P, D]; prompt_bias [prompts, P] (0, or -inf on left
// padding); gen_k/v [rows, kv_heads, T, D], of which tokens 0..t are this row's. Row r belongs to prompt
// r / group; query head j reads KV head j / (heads / kv_heads). Returns [rows, heads * D].
torch::Tensor grouped_attention(torch::Tensor q, torch::Tensor prompt_k, torch::Tensor prompt_v,
                                torch::Tensor prompt_bias, torch::Tensor gen_k, torch::Tensor gen_v,
                                int64_t t, double scaling) {
  for (auto* x : {&q, &prompt_k, &prompt_v, &prompt_bias, &gen_k, &gen_v}) {
    TORCH_CHECK(x->scalar_type() == torch::kFloat32 && x->device().is_cpu(), "grouped_attention: float32 CPU tensors");
    *x = x->contiguous();
  }
  const int64_t rows = q.size(0), heads = q.size(1), D = q.size(2);
  const int64_t prompts = prompt_k.size(0), kv_heads = prompt_k.size(1), P = prompt_k.size(2), T = gen_k.size(2);
  TORCH_CHECK(D % 16 == 0 && heads % kv_heads == 0 && rows % prompts == 0 && t < T, "grouped_attention: shapes");
  const int64_t group = rows / prompts, rep = heads / kv_heads, lanes_per_kv = group * rep, new_tokens = t + 1;
  const int64_t chunks = (lanes_per_kv + 15) / 16;
  torch::Tensor out = torch::empty({rows, heads * D}, q.options());
  const float *qp = q.data_ptr<float>(), *biasp = prompt_bias.data_ptr<float>();
  const float *gkp = gen_k.data_ptr<float>(), *gvp = gen_v.data_ptr<float>();  // hoisted: data_ptr checks its dtype on each call
  float* outp = out.data_ptr<float>();
  const float scale = static_cast<float>(scaling);

  at::parallel_for(0, prompts * kv_heads * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<vec16> qt(D), scores(P + new_tokens), acc(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t p = task / (kv_heads * chunks), h = task / chunks % kv_heads, first = task % chunks * 16;
      const int64_t lanes = std::min<int64_t>(16, lanes_per_kv - first);
      // lane i: query head h * rep + (first + i) % rep of row p * group + (first + i) / rep
      int64_t lane_row[16], lane_head[16];
      for (int64_t i = 0; i < 16; ++i) {
        int64_t slot = first + std::min(i, lanes - 1);  // unused lanes repeat the last one; never stored
        lane_row[i] = p * group + slot / rep;
        lane_head[i] = h * rep + slot % rep;
      }
      float* qt_f = reinterpret_cast<float*>(qt.data());
      for (int64_t d = 0; d < D; ++d)
        for (int64_t i = 0; i < 16; ++i) qt_f[d * 16 + i] = qp[(lane_row[i] * heads + lane_head[i]) * D + d] * scale;

      // scores against the prompt's keys, 8 keys at a time: the skinny_linear loop with the queries as x.
      // The keys and values AHEAD rows on are prefetched, a line at a time between the FMAs: the 30 layers'
      // caches do not fit the CPU's, and on the hardware prefetcher alone the loops waited on memory.
      const float* keys = prompt_k.data_ptr<float>() + (p * kv_heads + h) * P * D;
      const float* bias = biasp + p * P;
      int64_t l = 0;
      for (; l + 8 <= P; l += 8) {
        const float* ahead = l + AHEAD + 8 <= P ? keys + (l + AHEAD) * D : nullptr;  // 8 rows: D / 2 lines
        vec16 s[8] = {};
        for (int64_t d = 0; d < D; ++d) {
          if (ahead && d % 2 == 0) __builtin_prefetch(ahead + d * 8);
          for (int j = 0; j < 8; ++j) s[j] += keys[(l + j) * D + d] * qt[d];
        }
        for (int j = 0; j < 8; ++j) scores[l + j] = s[j] + bias[l + j];
      }
      for (; l < P; ++l) {
        vec16 s = {};
        for (int64_t d = 0; d < D; ++d) s += keys[l * D + d] * qt[d];
        scores[l] = s + bias[l];
      }
      // scores against each lane's own generated keys (a different row per lane: one dot product each)
      for (int64_t u = 0; u < new_tokens; ++u) {
        alignas(64) float s[16];
        for (int64_t i = 0; i < 16; ++i) {
          const vec16u* k = reinterpret_cast<const vec16u*>(gkp + ((lane_row[i] * kv_heads + h) * T + u) * D);
          const vec16u* qv = reinterpret_cast<const vec16u*>(qp + (lane_row[i] * heads + lane_head[i]) * D);
          vec16 dot = {};
          for (int64_t c = 0; c < D / 16; ++c) dot += qv[c] * k[c];
          s[i] = sum16(dot) * scale;
        }
        scores[P + u] = *reinterpret_cast<vec16*>(s);
      }
      // softmax over prompt and new tokens, lane by lane
      vec16 top = scores[0];
      for (int64_t i = 1; i < P + new_tokens; ++i) top = top > scores[i] ? top : scores[i];
      vec16 total = {};
      for (int64_t i = 0; i < P + new_tokens; ++i) {
        scores[i] = exp16(scores[i] - top);
        total += scores[i];
      }
      // weighted sum of the prompt's values, 16 features at a time; acc[d] holds feature d of every lane
      const float* values = prompt_v.data_ptr<float>() + (p * kv_heads + h) * P * D;
      for (int64_t d0 = 0; d0 < D; d0 += 16) {
        vec16 a[16] = {};
        for (int64_t i = 0; i < P; ++i) {
          if (d0 == 0 && i + AHEAD < P)
            for (int64_t c = 0; c < D; c += 16) __builtin_prefetch(values + (i + AHEAD) * D + c);
          for (int j = 0; j < 16; ++j) a[j] += values[i * D + d0 + j] * scores[i];
        }
        for (int j = 0; j < 16; ++j) acc[d0 + j] = a[j];
      }
      // ... plus each lane's own new values, then normalise and store the lanes' rows
      for (int64_t i = 0; i < lanes; ++i) {
        float* o_f = outp + (lane_row[i] * heads + lane_head[i]) * D;
        for (int64_t d = 0; d < D; ++d) o_f[d] = acc[d][i];
        vec16u* o = reinterpret_cast<vec16u*>(o_f);
        for (int64_t u = 0; u < new_tokens; ++u) {
          const vec16u* v = reinterpret_cast<const vec16u*>(gvp + ((lane_row[i] * kv_heads + h) * T + u) * D);
          const float w = scores[P + u][i];
          for (int64_t c = 0; c < D / 16; ++c) o[c] += w * v[c];
        }
        const float norm = 1.f / total[i];
        for (int64_t c = 0; c < D / 16; ++c) o[c] *= norm;
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------
// decode_layer
// ---------------------------------------------------------------------------------------------------
// One Llama-family decoder layer of the decode step, the body of cpu_decode.decode_step's loop in one call: the
// step's small elementwise parts (norms, rotary, SiLU, residual adds, the cache write) cost more in torch
// op overhead than in arithmetic, so they run here between the matmuls.

// y = w * (x * rsqrt(mean(x^2) + eps)) over each of `rows` rows of `width` (HF's RMSNorm, float32).
static void rms_norm(const float* x, const float* w, float eps, float* y, int64_t rows, int64_t width) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * width;
    vec16 squares = {};
    int64_t i = 0;
    for (; i + 16 <= width; i += 16) {
      vec16 v = *reinterpret_cast<const vec16u*>(xr + i);
      squares += v * v;
    }
    float total = sum16(squares);
    for (; i < width; ++i) total += xr[i] * xr[i];
    const float scale = 1.f / std::sqrt(total / width + eps);
    for (i = 0; i < width; ++i) y[r * width + i] = w[i] * (xr[i] * scale);
  }
}

// Rotary embedding in place (HF's rotate-half layout): x [rows, heads, D], cos/sin [rows, D].
static void rotate(float* x, const float* cos, const float* sin, int64_t rows, int64_t heads, int64_t D) {
  const int64_t half = D / 2;
  std::vector<float> tmp(D);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + (r * heads + h) * D;
      const float *c = cos + r * D, *s = sin + r * D;
      for (int64_t d = 0; d < half; ++d) tmp[d] = v[d] * c[d] + -v[d + half] * s[d];
      for (int64_t d = half; d < D; ++d) tmp[d] = v[d] * c[d] + v[d - half] * s[d];
      std::copy(tmp.begin(), tmp.end(), v);
    }
}

// gate = silu(gate) * up = gate / (1 + e^-gate) * up, in place.
static void silu_mul(float* gate, const float* up, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    vec16 g = *reinterpret_cast<vec16u*>(gate + i);
    vec16 e = -g < 88.f ? -g : 88.f;  // e^88 is finite; beyond it silu is 0 to float precision anyway
    *reinterpret_cast<vec16u*>(gate + i) = g / (1.f + exp16(e)) * *reinterpret_cast<const vec16u*>(up + i);
  }
  for (; i < n; ++i) gate[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

// x [rows, hidden] becomes the layer's output, in place. weights (cpu_decode._compiled_layer_weights): input norm,
// q, q bias, k, k bias, v, v bias, q norm, k norm, o, o bias, post-attention norm, gate, gate bias, up, up
// bias, down, down bias (the optional ones None); eps: the input, q/k and post-attention norms'. Writes the
// new token's keys and values at index t of gen_k / gen_v, then attends as grouped_attention.
void decode_layer(torch::Tensor x, const c10::List<std::optional<torch::Tensor>>& weights, at::ArrayRef<double> eps,
                  torch::Tensor cos, torch::Tensor sin, torch::Tensor prompt_k, torch::Tensor prompt_v,
                  torch::Tensor prompt_bias, torch::Tensor gen_k, torch::Tensor gen_v, int64_t t, double scaling) {
  TORCH_CHECK(weights.size() == 18 && eps.size() == 3, "decode_layer: 18 weights, 3 eps");
  std::vector<torch::Tensor> w;
  for (size_t i = 0; i < weights.size(); ++i) {
    std::optional<torch::Tensor> tensor = weights.get(i);
    w.push_back(tensor.has_value() ? tensor->contiguous() : torch::Tensor());
    TORCH_CHECK(!w.back().defined() || (w.back().scalar_type() == torch::kFloat32 && w.back().device().is_cpu()),
                "decode_layer: float32 CPU weights");
  }
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && gen_k.is_contiguous() && gen_v.is_contiguous(),
              "decode_layer: float32 x; contiguous x, gen_k, gen_v (written in place)");
  const int64_t rows = x.size(0), hidden = x.size(1), kv_heads = gen_k.size(1), T = gen_k.size(2), D = gen_k.size(3);
  const int64_t heads = w[1].size(0) / D, inter = w[12].size(0);
  cos = cos.contiguous();
  sin = sin.contiguous();
  auto linear = [&](const torch::Tensor& in, int weight) {
    torch::Tensor y = torch::empty({rows, w[weight].size(0)}, in.options());
    linear_rows(in.data_ptr<float>(), w[weight].data_ptr<float>(), ptr(w[weight + 1]), y.data_ptr<float>(), rows,
                w[weight].size(1), w[weight].size(0));
    return y;
  };
  float* res = x.data_ptr<float>();  // the residual stream
  torch::Tensor h = torch::empty_like(x);
  rms_norm(res, ptr(w[0]), eps[0], h.data_ptr<float>(), rows, hidden);
  torch::Tensor q = linear(h, 1), k = linear(h, 3), v = linear(h, 5);
  if (w[7].defined()) {  // Qwen3: RMSNorm of each head's query and key
    rms_norm(q.data_ptr<float>(), ptr(w[7]), eps[1], q.data_ptr<float>(), rows * heads, D);
    rms_norm(k.data_ptr<float>(), ptr(w[8]), eps[1], k.data_ptr<float>(), rows * kv_heads, D);
  }
  rotate(q.data_ptr<float>(), ptr(cos), ptr(sin), rows, heads, D);
  rotate(k.data_ptr<float>(), ptr(cos), ptr(sin), rows, kv_heads, D);
  const float *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float *gk = gen_k.data_ptr<float>(), *gv = gen_v.data_ptr<float>();
  for (int64_t r = 0; r < rows * kv_heads; ++r) {  // row r / kv_heads, KV head r % kv_heads
    std::copy_n(kp + r * D, D, gk + (r * T + t) * D);
    std::copy_n(vp + r * D, D, gv + (r * T + t) * D);
  }
  torch::Tensor attended = grouped_attention(q.view({rows, heads, D}), prompt_k, prompt_v, prompt_bias, gen_k, gen_v, t, scaling);
  torch::Tensor o = linear(attended, 9);
  const float* op = o.data_ptr<float>();
  for (int64_t i = 0; i < rows * hidden; ++i) res[i] += op[i];
  rms_norm(res, ptr(w[11]), eps[2], h.data_ptr<float>(), rows, hidden);
  torch::Tensor gate = linear(h, 12), up = linear(h, 14);
  silu_mul(gate.data_ptr<float>(), up.data_ptr<float>(), rows * inter);
  torch::Tensor down = linear(gate, 16);
  const float* dp = down.data_ptr<float>();
  for (int64_t i = 0; i < rows * hidden; ++i) res[i] += dp[i];
}

// ---------------------------------------------------------------------------------------------------
// gumbel_sample
// ---------------------------------------------------------------------------------------------------
// rollouts._sample at top-p 1: token = argmax(log_softmax(logits / T) + gumbel_noise(key)), and its log-prob,
// row by row in three passes over the row (max, sum of exponentials, scores) with the noise computed in
// place: torch makes a dozen [rows, vocab] temporaries of it. The noise is rollouts.gumbel_noise's: the same
// integer hash, the same 23-bit uniforms, -log(-log u) with the log below (torch's differs in the last bit
// at times, which moves a sample only at a tie within rounding).
typedef uint32_t uint16v __attribute__((vector_size(64)));

static inline uint16v lowbias32(uint16v x) {  // rollouts._mix32
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

// ln x for each lane, x positive and normal (Cephes' logf: x = m 2^e with m in [sqrt(1/2), sqrt(2)), a
// degree-9 polynomial in m - 1; about 1 ulp).
static inline vec16 log16(vec16 x) {
  int16v bits = reinterpret_cast<int16v&>(x);
  vec16 e = __builtin_convertvector(((bits >> 23) & 0xff) - 126, vec16);
  int16v mantissa = (bits & 0x807fffff) | 0x3f000000;  // in [1/2, 1)
  vec16 m = reinterpret_cast<vec16&>(mantissa);
  auto small = m < 0.707106781186547524f;
  e = small ? e - 1.f : e;
  m = small ? m + m - 1.f : m - 1.f;
  vec16 z = m * m;
  vec16 y = m * 7.0376836292e-2f - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z + e * -2.12194440e-4f - 0.5f * z;
  return m + y + e * 0.693359375f;
}

std::tuple<torch::Tensor, torch::Tensor> gumbel_sample(torch::Tensor logits, torch::Tensor keys, double temperature) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == torch::kFloat32 && logits.device().is_cpu(), "gumbel_sample: float32 CPU logits [rows, vocab]");
  TORCH_CHECK(keys.dim() == 1 && keys.size(0) == logits.size(0) && keys.scalar_type() == torch::kLong, "gumbel_sample: int64 keys [rows]");
  TORCH_CHECK(temperature > 0, "gumbel_sample: temperature > 0");
  logits = logits.contiguous();
  keys = keys.contiguous();
  const int64_t rows = logits.size(0), V = logits.size(1), blocks = (V + 15) / 16;
  torch::Tensor token = torch::empty({rows}, keys.options()), logp = torch::empty({rows}, logits.options());
  const float* lp = logits.data_ptr<float>();
  const int64_t* kp = keys.data_ptr<int64_t>();
  int64_t* tp = token.data_ptr<int64_t>();
  float* op = logp.data_ptr<float>();
  const float inv_unit = 1.f / 8388608.f;  // 2^-23
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<vec16> s(blocks);  // the row / T, padded with -inf to whole vectors
    for (int64_t r = begin; r < end; ++r) {
      float* sf = reinterpret_cast<float*>(s.data());
      for (int64_t i = 0; i < blocks * 16; ++i)
        sf[i] = i < V ? (temperature == 1.0 ? lp[r * V + i] : lp[r * V + i] / static_cast<float>(temperature)) : -INFINITY;
      vec16 top = s[0];
      for (int64_t b = 1; b < blocks; ++b) top = top > s[b] ? top : s[b];
      float row_max = top[0];
      for (int i = 1; i < 16; ++i) row_max = std::max(row_max, top[i]);
      vec16 total = {};
      for (int64_t b = 0; b < blocks; ++b) total += exp16(s[b] - row_max);
      const float log_total = std::log(sum16(total));
      // scores: log-prob + noise; each lane keeps its first best, then the lanes' best with the lowest index
      const uint16v key = (uint16v){} + static_cast<uint32_t>(kp[r]);
      const uint16v lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
      vec16 best = (vec16){} - INFINITY;
      uint16v best_index = {};
      for (int64_t b = 0; b < blocks; ++b) {
        uint16v index = lane + static_cast<uint32_t>(b * 16);
        uint16v bits = lowbias32(key ^ lowbias32(index));
        vec16 u = (__builtin_convertvector(bits >> 9, vec16) + 0.5f) * inv_unit;
        vec16 score = ((s[b] - row_max) - log_total) + -log16(-log16(u));
        auto better = score > best;
        best = better ? score : best;
        best_index = better ? index : best_index;
      }
      int64_t pick = best_index[0];
      float pick_score = best[0];
      for (int i = 1; i < 16; ++i)
        if (best[i] > pick_score || (best[i] == pick_score && best_index[i] < pick)) pick = best_index[i], pick_score = best[i];
      tp[r] = pick;
      op[r] = (sf[pick] - row_max) - log_total;
    }
  });
  return {token, logp};
}

TORCH_LIBRARY(agrl, m) {
  m.def("skinny_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("grouped_attention(Tensor q, Tensor prompt_k, Tensor prompt_v, Tensor prompt_bias, Tensor gen_k, Tensor gen_v, int t, float scaling) -> Tensor");
  m.def("decode_layer(Tensor(a!) x, Tensor?[] weights, float[] eps, Tensor cos, Tensor sin, Tensor prompt_k, Tensor prompt_v, "
        "Tensor prompt_bias, Tensor(b!) gen_k, Tensor(c!) gen_v, int t, float scaling) -> ()");
  m.def("gumbel_sample(Tensor logits, Tensor keys, float temperature) -> (Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(agrl, CPU, m) {
  m.impl("skinny_linear", &skinny_linear);
  m.impl("grouped_attention", &grouped_attention);
  m.impl("decode_layer", &decode_layer);
  m.impl("gumbel_sample", &gumbel_sample);
}
