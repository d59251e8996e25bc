// The decoder layers of one lean decode step (engine/lean_decode.py) in C++: the same ATen
// operations, in the same order, on the same tensors, so the logits stay bitwise transformers'.
// What goes away is the Python interpreter between them: at one row a 135M model's step is
// ~1,500 small operations, and from Python each one costs more than its kernel.
//
// RMSNorm's and the rotary embedding's element-wise operations (~700 of those per step for a
// 30-layer model) run as loops here instead, rounding where each ATen operation rounds its
// result, and the rotated keys go straight into the cache; a boolean mask is made additive
// once per step, not in every layer's attention. The greedy sampler's argmax is here too.
//
// Built at first use by engine/native_step.py (torch.utils.cpp_extension); registered as
// torch.ops.chatvlm_native.decode_layers.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

namespace {

// Per layer, this many optional tensors, in this order (engine/native_step.py packs them).
enum Slot : int64_t {
  IN_NORM, POST_NORM,
  QKV_INT4, QKV_SZ, QKV_BIAS,
  Q_W, Q_B, Q_INT4, Q_SZ,
  K_W, K_B, K_INT4, K_SZ,
  V_W, V_B, V_INT4, V_SZ,
  O_W, O_B, O_INT4, O_SZ,
  GU_INT4, GU_SZ, GU_BIAS,
  G_W, G_B, G_INT4, G_SZ,
  U_W, U_B, U_INT4, U_SZ,
  D_W, D_B, D_INT4, D_SZ,
  QKV_PK, QKV_PB, O_PK, GU_PK, GU_PB, D_PK,
  K_BUF, V_BUF,
  STRIDE
};

using Slots = c10::List<std::optional<at::Tensor>>;

struct Layer {
  const Slots& s;
  int64_t base;
  at::Tensor get(int64_t i) const {
    std::optional<at::Tensor> t = s.get(base + i);
    return t.has_value() ? *t : at::Tensor();
  }
};

// Element-wise loops over bf16 or fp32 values that round exactly as ATen does: each ATen
// operation rounds its own result to its dtype once (bf16: to nearest even, as c10::BFloat16).
// Built for a few instruction sets, picked at load (GCC on x86-64), so that they vectorize;
// -ffp-contract=off (engine/native_step.py) keeps a multiply and an add two roundings.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CHATVLM_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CHATVLM_CLONES
#endif

// The bits of a float as an integer and back (memcpy where the builtin is missing, GCC < 11:
// correct, though the loops may not vectorize there).
#if defined(__has_builtin)
#if __has_builtin(__builtin_bit_cast)
#define CHATVLM_BIT_CAST 1
#endif
#endif
template <typename To, typename From>
inline To bits_as(From from) {
#ifdef CHATVLM_BIT_CAST
  return __builtin_bit_cast(To, from);
#else
  To to;
  std::memcpy(&to, &from, sizeof to);
  return to;
#endif
}

struct Bf16 {
  using raw = uint16_t;
  static float load(raw b) { return bits_as<float>(static_cast<uint32_t>(b) << 16); }
  static raw store(float f) {  // c10::BFloat16's round_to_nearest_even
    const uint32_t u = bits_as<uint32_t>(f);
    const raw rounded = static_cast<raw>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return f != f ? static_cast<raw>(0x7FC0) : rounded;
  }
};

struct F32 {
  using raw = float;
  static float load(raw f) { return f; }
  static raw store(float f) { return f; }
};

// x * x for every element of h (as float32): x.to(float32).pow(2).
template <typename D>
CHATVLM_CLONES void squares_loop(const typename D::raw* __restrict h, float* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float x = D::load(h[i]);
    out[i] = x * x;
  }
}

// weight * (x * inv).to(dtype) for one row.
template <typename D>
CHATVLM_CLONES void normed_loop(const typename D::raw* __restrict h, const typename D::raw* __restrict w, float inv,
                                typename D::raw* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float normed = D::load(D::store(D::load(h[i]) * inv));
    out[i] = D::store(D::load(w[i]) * normed);
  }
}

// transformers' LlamaRMSNorm: float32 inside, the weight times the result in the input's dtype.
//   x = h.to(float32); variance = x.pow(2).mean(-1, keepdim); x = x * rsqrt(variance + eps)
//   return weight * x.to(h.dtype)
// The mean stays ATen's own reduction over the same squares, so the variance has its bits;
// ``variance + eps`` adds the Python float as a float32, and rsqrt is 1 / sqrt (both exact).
template <typename D>
at::Tensor rms_norm_fused(const at::Tensor& h, const at::Tensor& weight, double eps) {
  using raw = typename D::raw;
  const int64_t rows = h.size(0), width = h.size(1);
  const raw* hp = reinterpret_cast<const raw*>(h.data_ptr());
  const raw* wp = reinterpret_cast<const raw*>(weight.data_ptr());
  at::Tensor squares = at::empty({rows, width}, h.options().dtype(at::kFloat));
  squares_loop<D>(hp, squares.data_ptr<float>(), rows * width);
  at::Tensor variance = squares.mean(-1, true);
  const float* vp = variance.data_ptr<float>();
  at::Tensor out = at::empty_like(h);
  raw* op = reinterpret_cast<raw*>(out.data_ptr());
  const float e = static_cast<float>(eps);
  for (int64_t r = 0; r < rows; ++r)
    normed_loop<D>(hp + r * width, wp, 1.0f / std::sqrt(vp[r] + e), op + r * width, width);
  return out;
}

at::Tensor rms_norm(const at::Tensor& h, const at::Tensor& weight, double eps) {
  if (h.dim() == 2 && h.is_contiguous() && weight.is_contiguous() && weight.dim() == 1 &&
      weight.size(0) == h.size(1) && weight.scalar_type() == h.scalar_type()) {
    if (h.scalar_type() == at::kBFloat16) return rms_norm_fused<Bf16>(h, weight, eps);
    if (h.scalar_type() == at::kFloat) return rms_norm_fused<F32>(h, weight, eps);
  }
  at::Tensor x = h.to(at::kFloat);
  at::Tensor variance = x.pow(2).mean(-1, true);
  x = x * at::rsqrt(variance + eps);
  return weight * x.to(h.scalar_type());
}

// oneDNN's linear on a weight reordered once into its blocked layout (engine/packed.py): the
// same values as at::linear on the plain weight for the rows it is used for (checked when the
// weights are packed), without reordering the weight at every call.
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& bias) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack{x, packed, bias.defined() ? c10::IValue(bias) : c10::IValue(), std::string("none"),
                          c10::List<std::optional<at::Scalar>>(), c10::IValue()};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// ---- Weight-only int4 and int8 matmuls for fp32 activations (decode steps) -------------------
// ATen's CPU kernels for these run vectorized for bf16 activations only: with fp32 ones they
// are 5-10x slower than the dense fp32 GEMM (measured on an avx2 CPU, docs/BENCHMARKS.md), so
// an fp32 model on a CPU without bf16 would read a quarter of the bytes and still decode slower.
// These read the very same buffers (engine/quant.py): ATen's int4 layout with its scales and
// zeros, and the int8 weight with its per-output scales. Each output is a sum over the inputs
// in fp32; the order of the additions is this kernel's, not ATen's (values equal to rounding).
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define CHATVLM_X86_KERNELS 1
#endif

bool fast_kernels() {
#ifdef CHATVLM_X86_KERNELS
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

#ifdef CHATVLM_X86_KERNELS
constexpr int64_t INT4_BLOCK = 32;  // outputs this file's kernel takes at a time

// ATen's CPU int4 layout, which depends on the kernel ATen runs on this CPU: blocks of BN
// outputs, 32 where it runs its avx2 kernel and 64 where it runs its avx512 one (an AMD EPYC
// with avx512 here: read as blocks of 32, every product was wrong). Block b's codes start at
// byte b * BN * k / 2 and take BN / 2 bytes per input: output j in the low nibble of byte j
// for j < BN / 2, in the high nibble of byte j - BN / 2 otherwise. A last block of fewer
// outputs (16, 32 or 48) holds them in pairs: output 2p in the low nibble of byte p, 2p + 1 in
// the high one. The weight is (code - 8) * scale + zero, with a scale and a zero per output and
// group of inputs (sz: (k / group, n, 2)).
//
// BN, found once by packing a probe with ATen's own function and comparing its bytes with each
// layout's, a last narrower block included; 0 when neither matches (ATen's kernel then runs).
int64_t int4_layout() {
  static const int64_t found = [] {
    const int64_t n = 112, k = 2;  // 64 + 48, or 3 * 32 + 16
    at::Tensor w = at::empty({n, k}, at::kInt);
    int32_t* v = w.data_ptr<int32_t>();
    for (int64_t j = 0; j < n; ++j)
      for (int64_t i = 0; i < k; ++i) v[j * k + i] = static_cast<int32_t>((j * 7 + i * 3 + j / 16) % 16);
    at::Tensor packed;
    try {
      packed = at::_convert_weight_to_int4pack_for_cpu(w, 1).contiguous();
    } catch (const std::exception&) {
      return int64_t(0);
    }
    if (packed.scalar_type() != at::kByte || packed.numel() != n * k / 2) return int64_t(0);
    const uint8_t* got = packed.data_ptr<uint8_t>();
    for (const int64_t bn : {int64_t(32), int64_t(64)}) {
      bool same = true;
      for (int64_t o = 0; o < n; o += bn) {
        const int64_t nb = std::min(bn, n - o);
        for (int64_t i = 0; i < k; ++i)
          for (int64_t j = 0; j < nb / 2; ++j) {
            const int64_t lo = nb == bn ? o + j : o + 2 * j, hi = nb == bn ? o + j + nb / 2 : o + 2 * j + 1;
            same = same && got[o * k / 2 + i * nb / 2 + j] == static_cast<uint8_t>(v[lo * k + i] | (v[hi * k + i] << 4));
          }
      }
      if (same) return bn;
    }
    return int64_t(0);
  }();
  return found;
}

// How a part of a weight's outputs lies in that layout (int4_mm cuts it into parts): a block
// of 32 (LOW_HIGH: its 16 bytes per input, the low nibbles then the high ones), half of a block
// of 64 (HALF: its 32 bytes per input, their low nibbles, ``shift`` 0, or their high ones, 4),
// or 16 outputs of a last, narrower block (PAIRS: 8 of its bytes per input).
enum Int4Kind { LOW_HIGH = 0, HALF = 1, PAIRS = 2 };

// A part's outputs: 32, or 16 for PAIRS.
template <int KIND>
constexpr int int4_vectors() { return KIND == PAIRS ? 2 : 4; }

// The codes of one input (from ``at``) for a part's outputs, as int4_vectors vectors of 8
// floats (outputs 0-7, 8-15, ...), each byte zero-extended into 32-bit lanes straight from memory.
template <int KIND>
__attribute__((target("avx2,fma"))) inline void int4_codes(const uint8_t* at, __m128i shift, __m256* w) {
  const __m256i mask = _mm256_set1_epi32(0x0F);
  if constexpr (KIND == HALF) {
    for (int v = 0; v < 4; ++v) {
      const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(at + 8 * v)));
      w[v] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srl_epi32(a, shift), mask));
    }
  } else if constexpr (KIND == PAIRS) {
    // Each byte twice (b0 b0 b1 b1 ...), the low nibble from the first, the high from the second.
    const __m256i shifts = _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4);
    for (int v = 0; v < 2; ++v) {
      int32_t four;
      std::memcpy(&four, at + 4 * v, sizeof four);
      const __m128i b = _mm_cvtsi32_si128(four);
      const __m256i a = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(b, b));
      w[v] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(a, shifts), mask));
    }
  } else {
    const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(at)));
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(at + 8)));
    w[0] = _mm256_cvtepi32_ps(_mm256_and_si256(a, mask));
    w[1] = _mm256_cvtepi32_ps(_mm256_and_si256(b, mask));
    w[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4));
    w[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
  }
}

// ``R`` rows (1 or 2) of x times one part's outputs (``codes``: the first input's, ``stride``
// bytes apart; ``shift``: see int4_codes). Per group the codes' products with x are summed
// first, then scaled: sum(((q - 8) s + z) x) = s sum(q x) + (z - 8 s) sum(x). Each output's
// sums run in the same order whatever part it is in.
template <int R, int KIND>
__attribute__((target("avx2,fma"))) void int4_block(const float* x, int64_t k, const uint8_t* codes, int64_t stride,
                                                   __m128i shift, const float* sz, int64_t n, int64_t group,
                                                   const float* xsum, float* out) {
  constexpr int V = int4_vectors<KIND>();
  __m256 total[R][4];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) total[r][v] = _mm256_setzero_ps();
  const int64_t groups = k / group;
  for (int64_t g = 0; g < groups; ++g) {
    // Two sets of sums (even and odd inputs), so that consecutive multiply-adds do not wait on
    // one another.
    __m256 acc[R][4], odd[R][4];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) acc[r][v] = odd[r][v] = _mm256_setzero_ps();
    int64_t i = g * group;
    const int64_t end = (g + 1) * group;
    for (; i + 2 <= end; i += 2) {
      __m256 w[4], u[4];
      int4_codes<KIND>(codes + i * stride, shift, w);
      int4_codes<KIND>(codes + i * stride + stride, shift, u);
      for (int r = 0; r < R; ++r) {
        const __m256 xv = _mm256_broadcast_ss(x + r * k + i), xu = _mm256_broadcast_ss(x + r * k + i + 1);
        for (int v = 0; v < V; ++v) {
          acc[r][v] = _mm256_fmadd_ps(w[v], xv, acc[r][v]);
          odd[r][v] = _mm256_fmadd_ps(u[v], xu, odd[r][v]);
        }
      }
    }
    for (; i < end; ++i) {
      __m256 w[4];
      int4_codes<KIND>(codes + i * stride, shift, w);
      for (int r = 0; r < R; ++r) {
        const __m256 xv = _mm256_broadcast_ss(x + r * k + i);
        for (int v = 0; v < V; ++v) acc[r][v] = _mm256_fmadd_ps(w[v], xv, acc[r][v]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) acc[r][v] = _mm256_add_ps(acc[r][v], odd[r][v]);
    // The group's scales and zeros for the part's outputs, (scale, zero) pairs split into
    // two vectors of 8 each.
    const float* p = sz + g * n * 2;
    for (int v = 0; v < V; ++v) {
      const __m256 a = _mm256_loadu_ps(p + 16 * v), b = _mm256_loadu_ps(p + 16 * v + 8);
      const __m256 sv = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xD8));
      const __m256 zv = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xDD)), 0xD8));
      const __m256 base = _mm256_sub_ps(zv, _mm256_mul_ps(_mm256_set1_ps(8.0f), sv));
      for (int r = 0; r < R; ++r) {
        const __m256 xs = _mm256_set1_ps(xsum[r * groups + g]);
        total[r][v] = _mm256_add_ps(total[r][v], _mm256_add_ps(_mm256_mul_ps(sv, acc[r][v]), _mm256_mul_ps(base, xs)));
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) _mm256_storeu_ps(out + r * n + 8 * v, total[r][v]);
}

// ``RR`` rows (1 to 4) times 16 outputs of a dequantized tile (rows of INT4_BLOCK floats), added
// into ``out``: each weight vector is loaded once and used by every row.
template <int RR>
__attribute__((target("avx2,fma"))) inline void int4_tile_rows(const float* x, int64_t k, const float* tile,
                                                              int64_t group, float* out, int64_t n) {
  __m256 a[RR][2];
  for (int r = 0; r < RR; ++r) a[r][0] = a[r][1] = _mm256_setzero_ps();
  for (int64_t i = 0; i < group; ++i) {
    const __m256 w0 = _mm256_load_ps(tile + i * INT4_BLOCK), w1 = _mm256_load_ps(tile + i * INT4_BLOCK + 8);
    for (int r = 0; r < RR; ++r) {
      const __m256 b = _mm256_broadcast_ss(x + r * k + i);
      a[r][0] = _mm256_fmadd_ps(w0, b, a[r][0]);
      a[r][1] = _mm256_fmadd_ps(w1, b, a[r][1]);
    }
  }
  for (int r = 0; r < RR; ++r)
    for (int v = 0; v < 2; ++v) {
      float* o = out + r * n + 8 * v;
      _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), a[r][v]));
    }
}

// Three rows or more: each group's weights of a part are dequantized once into ``tile``
// (group x 32 floats, in L1), then read by four rows at a time, 16 outputs at a time, so the
// codes are decoded once per call and the multiply-adds run from registers.
template <int KIND>
__attribute__((target("avx2,fma"))) void int4_block_rows(const float* x, int64_t rows, int64_t k, const uint8_t* codes,
                                                        int64_t stride, __m128i shift, const float* sz, int64_t n,
                                                        int64_t group, float* out, float* tile) {
  constexpr int V = int4_vectors<KIND>(), OUTS = 8 * V;
  const __m256 eight = _mm256_set1_ps(8.0f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < OUTS; ++j) out[r * n + j] = 0.0f;
  alignas(32) float s[INT4_BLOCK], z[INT4_BLOCK];
  const int64_t groups = k / group;
  for (int64_t g = 0; g < groups; ++g) {
    const float* p = sz + g * n * 2;
    for (int64_t j = 0; j < OUTS; ++j) s[j] = p[2 * j], z[j] = p[2 * j + 1];
    __m256 sv[4], zv[4];
    for (int v = 0; v < V; ++v) sv[v] = _mm256_load_ps(s + 8 * v), zv[v] = _mm256_load_ps(z + 8 * v);
    for (int64_t i = 0; i < group; ++i) {
      __m256 w[4];
      int4_codes<KIND>(codes + (g * group + i) * stride, shift, w);
      for (int v = 0; v < V; ++v)
        _mm256_store_ps(tile + i * INT4_BLOCK + 8 * v,
                        _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(w[v], eight), sv[v]), zv[v]));
    }
    for (int64_t r = 0; r < rows; r += 4) {
      for (int64_t half = 0; half < OUTS; half += 16) {
        const float* x0 = x + r * k + g * group;
        float* o = out + r * n + half;
        switch (std::min<int64_t>(rows - r, 4)) {
          case 1: int4_tile_rows<1>(x0, k, tile + half, group, o, n); break;
          case 2: int4_tile_rows<2>(x0, k, tile + half, group, o, n); break;
          case 3: int4_tile_rows<3>(x0, k, tile + half, group, o, n); break;
          default: int4_tile_rows<4>(x0, k, tile + half, group, o, n); break;
        }
      }
    }
  }
}

// ``R`` rows (1 to 4) of x times one output's int8 weights (k a multiple of 16), unscaled.
template <int R>
__attribute__((target("avx2,fma"))) void int8_row(const float* x, int64_t k, const int8_t* w, float* dots) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t i = 0; i < k; i += 16) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i));
    const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
    const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8)));
    for (int r = 0; r < R; ++r) {
      acc[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * k + i), acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + r * k + i + 8), acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m256 s = _mm256_add_ps(acc[r][0], acc[r][1]);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    dots[r] = _mm_cvtss_f32(h);
  }
}
#endif

// ---- Attention of one query position per row, each row from its own first position ----------
// For the ragged cache (engine/long_prompts.py): after a long prompt joins, each row attends
// from its own first real position, so a row's padding is never read. ATen's SDPA takes that as
// one call per row, and for a long row it reads each key/value head once per query head of its
// group, on as many threads as the row has heads. Here each key and value is read once for all
// the query heads of its group, and a long row is split into blocks of positions that run on
// all threads (partial softmax sums merged in block order, so a row's values do not depend on
// the batch it is in or on the thread count). Sums in fp32; bf16 inputs are widened on load and
// the output rounded once, as SDPA does. Values equal SDPA's to rounding (the exponent is a
// polynomial, ~1 ulp).
#ifdef CHATVLM_X86_KERNELS
constexpr int64_t ATTN_BLOCK = 256;  // positions per work item

__attribute__((target("avx2,fma"))) inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma"))) inline __m256 load8(const uint16_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

__attribute__((target("avx2,fma"))) inline float hsum8(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

// exp(x) for x <= 0 (a score minus its maximum): 2^n exp(r) with r in [-ln2/2, ln2/2] and
// Cephes' polynomial for exp(r); below -87 it is ~1e-38, i.e. nothing beside the maximum's 1.
__attribute__((target("avx2,fma"))) inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x);  // (a NaN stays a NaN: max takes its second operand)
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}

// One work item: the n_rep query heads of one group (``q``, ``q_head_stride`` apart) over
// positions [p0, p1) of their key/value head (``k``, ``v``). Writes per query head its scores'
// maximum, the sum of exp(score - maximum), and the exp-weighted sum of the values (DV * 8
// floats) to ``part``; ``scores`` holds n_rep * ATTN_BLOCK floats.
template <int DV, typename T>
__attribute__((target("avx2,fma"))) void attend_block(const T* q, int64_t q_head_stride, const T* k, const T* v,
                                                     int64_t pos_stride, int64_t p0, int64_t p1, int64_t n_rep,
                                                     float scaling, float* scores, float* part) {
  constexpr int64_t D = DV * 8;
  const int64_t len = p1 - p0;
  alignas(32) float qf[D];
  for (int64_t h = 0; h < n_rep; ++h) {
    for (int j = 0; j < DV; ++j) _mm256_store_ps(qf + 8 * j, _mm256_mul_ps(load8(q + h * q_head_stride + 8 * j),
                                                                           _mm256_set1_ps(scaling)));
    float* s = scores + h * ATTN_BLOCK;
    for (int64_t p = 0; p < len; ++p) {
      const T* kp = k + (p0 + p) * pos_stride;
      __m256 a = _mm256_mul_ps(_mm256_load_ps(qf), load8(kp)), b = _mm256_setzero_ps();
      for (int j = 1; j < DV; j += 2) {
        b = _mm256_fmadd_ps(_mm256_load_ps(qf + 8 * j), load8(kp + 8 * j), b);
        if (j + 1 < DV) a = _mm256_fmadd_ps(_mm256_load_ps(qf + 8 * j + 8), load8(kp + 8 * j + 8), a);
      }
      s[p] = hsum8(_mm256_add_ps(a, b));
    }
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t p = 0; p < len; ++p) top = std::max(top, s[p]);
    __m256 total = _mm256_setzero_ps();
    int64_t p = 0;
    for (; p + 8 <= len; p += 8) {
      const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + p), _mm256_set1_ps(top)));
      _mm256_storeu_ps(s + p, e);
      total = _mm256_add_ps(total, e);
    }
    float sum = hsum8(total);
    if (p < len) {
      alignas(32) float tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t i = p; i < len; ++i) tail[i - p] = s[i];
      __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_load_ps(tail), _mm256_set1_ps(top)));
      _mm256_store_ps(tail, e);
      for (int64_t i = p; i < len; ++i) s[i] = tail[i - p], sum += tail[i - p];
    }
    __m256 acc[DV];
    for (int j = 0; j < DV; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t i = 0; i < len; ++i) {
      const __m256 w = _mm256_set1_ps(s[i]);
      const T* vp = v + (p0 + i) * pos_stride;
      for (int j = 0; j < DV; ++j) acc[j] = _mm256_fmadd_ps(w, load8(vp + 8 * j), acc[j]);
    }
    float* o = part + h * (D + 2);
    o[0] = top;
    o[1] = sum;
    for (int j = 0; j < DV; ++j) _mm256_storeu_ps(o + 2 + 8 * j, acc[j]);
  }
}

template <int DV, typename T>
void attend_rows(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, at::IntArrayRef starts,
                 int64_t n_rep, double scaling, at::Tensor& out) {
  constexpr int64_t D = DV * 8;
  const int64_t rows = q.size(0), kv_heads = keys.size(1), length = keys.size(2);
  struct Item { int64_t row, group, p0, p1; };
  std::vector<Item> items;
  std::vector<int64_t> first(rows * kv_heads + 1, 0);  // each (row, group)'s first item
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < kv_heads; ++g) {
      first[r * kv_heads + g] = static_cast<int64_t>(items.size());
      for (int64_t p = starts[r]; p < length; p += ATTN_BLOCK) items.push_back({r, g, p, std::min(p + ATTN_BLOCK, length)});
    }
  first[rows * kv_heads] = static_cast<int64_t>(items.size());
  std::vector<float> parts(items.size() * n_rep * (D + 2));
  const T* qp = reinterpret_cast<const T*>(q.data_ptr());
  const T* kp = reinterpret_cast<const T*>(keys.data_ptr());
  const T* vp = reinterpret_cast<const T*>(values.data_ptr());
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(n_rep * ATTN_BLOCK);
    for (int64_t i = i0; i < i1; ++i) {
      const Item& it = items[i];
      attend_block<DV, T>(qp + it.row * q.stride(0) + it.group * n_rep * q.stride(1), q.stride(1),
                          kp + it.row * keys.stride(0) + it.group * keys.stride(1),
                          vp + it.row * values.stride(0) + it.group * values.stride(1), keys.stride(2), it.p0, it.p1,
                          n_rep, static_cast<float>(scaling), scores.data(), parts.data() + i * n_rep * (D + 2));
    }
  });
  // Merge each (row, group)'s blocks in order: out = sum_b exp(m_b - M) acc_b / sum_b exp(m_b - M) s_b.
  float* op = out.data_ptr<float>();
  for (int64_t rg = 0; rg < rows * kv_heads; ++rg) {
    const int64_t r = rg / kv_heads, g = rg % kv_heads;
    for (int64_t h = 0; h < n_rep; ++h) {
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t i = first[rg]; i < first[rg + 1]; ++i) top = std::max(top, parts[(i * n_rep + h) * (D + 2)]);
      float total = 0.0f, acc[D] = {};
      for (int64_t i = first[rg]; i < first[rg + 1]; ++i) {
        const float* pt = parts.data() + (i * n_rep + h) * (D + 2);
        const float f = std::exp(pt[0] - top);
        total += pt[1] * f;
        for (int64_t d = 0; d < D; ++d) acc[d] += pt[2 + d] * f;
      }
      float* o = op + (r * kv_heads * n_rep + g * n_rep + h) * D;
      for (int64_t d = 0; d < D; ++d) o[d] = acc[d] / total;
    }
  }
}
#endif

// q (rows, heads, 1, D) against keys and values (rows, kv_heads, length, D), each row from its
// own first position ``starts[r]``; heads = kv_heads * n_rep. Returns (rows, heads, 1, D) in
// q's dtype, or an undefined tensor where this kernel does not run (the caller runs SDPA).
at::Tensor attend_from(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, at::IntArrayRef starts,
                       int64_t n_rep, double scaling) {
#ifdef CHATVLM_X86_KERNELS
  if (q.dim() != 4) return at::Tensor();
  const auto t = q.scalar_type();
  const int64_t rows = q.size(0), d = q.size(3);
  auto fits = [&](const at::Tensor& a) {
    return a.dim() == 4 && a.scalar_type() == t && a.device().is_cpu() && a.size(0) == rows && a.size(3) == d &&
           a.stride(3) == 1 && a.stride(2) == d;
  };
  bool ok = fast_kernels() && (t == at::kFloat || t == at::kBFloat16) && (d == 16 || d == 32 || d == 64 || d == 128) &&
            q.size(2) == 1 && q.stride(3) == 1 && q.device().is_cpu() && fits(keys) && fits(values) &&
            keys.sizes() == values.sizes() && n_rep > 0 && q.size(1) == keys.size(1) * n_rep &&
            static_cast<int64_t>(starts.size()) == rows;
  for (int64_t r = 0; ok && r < rows; ++r) ok = starts[r] >= 0 && starts[r] < keys.size(2);
  if (!ok) return at::Tensor();
  at::Tensor out = at::empty({rows, q.size(1), 1, d}, q.options().dtype(at::kFloat));
  auto run = [&](auto tag) {
    using T = decltype(tag);
    switch (d) {
      case 16: attend_rows<2, T>(q, keys, values, starts, n_rep, scaling, out); break;
      case 32: attend_rows<4, T>(q, keys, values, starts, n_rep, scaling, out); break;
      case 64: attend_rows<8, T>(q, keys, values, starts, n_rep, scaling, out); break;
      default: attend_rows<16, T>(q, keys, values, starts, n_rep, scaling, out); break;
    }
  };
  if (t == at::kFloat) {
    run(float{});
    return out;
  }
  run(uint16_t{});
  return out.to(t);
#else
  return at::Tensor();
#endif
}

// How many of the intra-op threads an at::parallel_for over ``items`` items runs on: ATen's
// parallel_for is an OpenMP pragma in its headers, so a build without -fopenmp runs it on one.
int64_t parallel_workers(int64_t items) {
  std::vector<int> used(std::max(at::get_num_threads(), 1), 0);
  at::parallel_for(0, items, 1, [&](int64_t, int64_t) {
    const int id = at::get_thread_num();
    if (id >= 0 && id < static_cast<int>(used.size())) used[id] = 1;
  });
  int64_t count = 0;
  for (int u : used) count += u;
  return count;
}

#ifdef CHATVLM_X86_KERNELS
// One part of int4_mm's outputs (see Int4Kind): its first output, its first input's codes,
// the bytes between inputs, and the nibble it reads (HALF).
struct Int4Part {
  int64_t out0;
  const uint8_t* codes;
  int64_t stride;
  int kind;
  int shift;
};

template <int KIND>
void int4_part(const Int4Part& p, const float* xp, int64_t rows, int64_t k, const float* sp, const float* xs,
               int64_t n, int64_t group, float* op, float* tile) {
  const int64_t groups = k / group;
  const __m128i shift = _mm_cvtsi32_si128(p.shift);
  const float* bsz = sp + p.out0 * 2;
  if (tile != nullptr) {
    int4_block_rows<KIND>(xp, rows, k, p.codes, p.stride, shift, bsz, n, group, op + p.out0, tile);
    return;
  }
  int64_t r = 0;
  for (; r + 2 <= rows; r += 2)
    int4_block<2, KIND>(xp + r * k, k, p.codes, p.stride, shift, bsz, n, group, xs + r * groups, op + r * n + p.out0);
  if (r < rows)
    int4_block<1, KIND>(xp + r * k, k, p.codes, p.stride, shift, bsz, n, group, xs + r * groups, op + r * n + p.out0);
}

// int4_mm's kernel: the ``n`` outputs in ATen's layout of blocks of ``bn`` (int4_layout), cut
// into parts of 32 outputs (16 in a last, narrower block) that run on the threads.
void int4_mm_parts(int64_t bn, const float* xp, int64_t rows, int64_t k, const uint8_t* cp, const float* sp,
                   const float* xs, int64_t n, int64_t group, float* op) {
  std::vector<Int4Part> parts;
  for (int64_t o = 0; o < n; o += bn) {
    const int64_t nb = std::min(bn, n - o);
    const uint8_t* base = cp + o * k / 2;
    if (nb == 32 && bn == 32) {
      parts.push_back({o, base, 16, LOW_HIGH, 0});
    } else if (nb == 64) {
      parts.push_back({o, base, 32, HALF, 0});
      parts.push_back({o + 32, base, 32, HALF, 4});
    } else {
      for (int64_t t = 0; t < nb / 16; ++t) parts.push_back({o + 16 * t, base + 8 * t, nb / 2, PAIRS, 0});
    }
  }
  at::parallel_for(0, static_cast<int64_t>(parts.size()), 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> tile_buf(rows > 2 ? group * INT4_BLOCK + 8 : 0);
    float* tile = tile_buf.empty() ? nullptr
                                   : reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(tile_buf.data()) + 31) & ~uintptr_t(31));
    for (int64_t b = b0; b < b1; ++b) {
      const Int4Part& p = parts[b];
      switch (p.kind) {
        case LOW_HIGH: int4_part<LOW_HIGH>(p, xp, rows, k, sp, xs, n, group, op, tile); break;
        case HALF: int4_part<HALF>(p, xp, rows, k, sp, xs, n, group, op, tile); break;
        default: int4_part<PAIRS>(p, xp, rows, k, sp, xs, n, group, op, tile); break;
      }
    }
  });
}
#endif

// x (rows, k) fp32 times the int4 copy (engine/quant.int4_pack): this file's kernel for fp32
// activations where it runs, ATen's otherwise.
at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& packed, int64_t group, const at::Tensor& sz) {
#ifdef CHATVLM_X86_KERNELS
  const int64_t n = packed.dim() == 2 ? packed.size(0) : -1, k = packed.dim() == 2 ? packed.size(1) * 2 : -1;
  const int64_t layout = fast_kernels() ? int4_layout() : 0;
  if (layout != 0 && x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == k && x.size(0) > 0 &&
      packed.scalar_type() == at::kByte && packed.is_contiguous() && n % 16 == 0 && group > 0 &&
      k % group == 0 && sz.scalar_type() == at::kFloat && sz.is_contiguous() && sz.dim() == 3 &&
      sz.size(0) == k / group && sz.size(1) == n && sz.size(2) == 2) {
    const at::Tensor xc = x.contiguous();
    const int64_t rows = xc.size(0), groups = k / group;
    // Each row's sum per group, for the one- and two-row path only (the tiled one dequantizes).
    const at::Tensor xsum = rows <= 2 ? xc.view({rows, groups, group}).sum(-1).contiguous() : at::Tensor();
    at::Tensor out = at::empty({rows, n}, xc.options());
    const float* xs = xsum.defined() ? xsum.data_ptr<float>() : nullptr;
    int4_mm_parts(layout, xc.data_ptr<float>(), rows, k, packed.data_ptr<uint8_t>(), sz.data_ptr<float>(), xs, n,
                  group, out.data_ptr<float>());
    return out;
  }
#endif
  return at::_weight_int4pack_mm_for_cpu(x, packed, group, sz);
}

// x (rows, k) fp32 times an int8 weight (n, k) with a scale per output (engine/quant.py's
// Int8WeightOnlyLinear): this file's kernel for fp32 activations where it runs, ATen's otherwise.
at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
#ifdef CHATVLM_X86_KERNELS
  if (fast_kernels() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(0) > 0 &&
      w.scalar_type() == at::kChar && w.dim() == 2 && w.is_contiguous() && x.size(1) == w.size(1) &&
      w.size(1) % 16 == 0 && scales.scalar_type() == at::kFloat && scales.dim() == 1 &&
      scales.size(0) == w.size(0)) {
    const at::Tensor xc = x.contiguous(), sc = scales.contiguous();
    const int64_t rows = xc.size(0), n = w.size(0), k = w.size(1);
    at::Tensor out = at::empty({rows, n}, xc.options());
    const float* xp = xc.data_ptr<float>();
    const float* sp = sc.data_ptr<float>();
    const int8_t* wp = w.data_ptr<int8_t>();
    float* op = out.data_ptr<float>();
    at::parallel_for(0, n, 64, [&](int64_t j0, int64_t j1) {
      float dots[4];
      for (int64_t j = j0; j < j1; ++j) {
        const int8_t* row = wp + j * k;  // in L1 for the next four rows
        for (int64_t r = 0; r < rows; r += 4) {
          const float* xr = xp + r * k;
          switch (std::min<int64_t>(rows - r, 4)) {
            case 1: int8_row<1>(xr, k, row, dots); break;
            case 2: int8_row<2>(xr, k, row, dots); break;
            case 3: int8_row<3>(xr, k, row, dots); break;
            default: int8_row<4>(xr, k, row, dots); break;
          }
          for (int64_t i = 0; i < std::min<int64_t>(rows - r, 4); ++i) op[(r + i) * n + j] = dots[i] * sp[j];
        }
      }
    });
    return out;
  }
#endif
  return at::_weight_int8pack_mm(x, w, scales);
}

// Which weights a projection of this many rows reads: the int4 copy for a few rows, else the
// packed dense weight up to ``packed_rows`` rows, else the plain one.
enum class Path { INT4, PACKED, PLAIN };
Path choose(const Layer& l, int64_t int4_slot, int64_t packed_slot, int64_t rows, int64_t gemv_rows,
            int64_t packed_rows) {
  if (rows <= gemv_rows && l.get(int4_slot).defined()) return Path::INT4;
  if (rows <= packed_rows && l.get(packed_slot).defined()) return Path::PACKED;
  return Path::PLAIN;
}

// One projection as its module runs it: the int4 kernel for a few rows when the layer has an
// int4 copy (Int4WeightOnlyLinear), otherwise F.linear on the dense weight (from its packed
// copy when there is one, ``pk``, and the rows are few enough).
at::Tensor project(const at::Tensor& x, const Layer& l, int64_t w, int64_t b, int64_t q, int64_t sz,
                   int64_t gemv_rows, int64_t group, int64_t pk = -1, int64_t packed_rows = 0) {
  at::Tensor packed = l.get(q), bias = l.get(b);
  if (pk >= 0 && choose(l, q, pk, x.size(0), gemv_rows, packed_rows) == Path::PACKED)
    return packed_linear(x, l.get(pk), bias);
  if (packed.defined() && x.size(0) <= gemv_rows) {
    at::Tensor out = int4_mm(x.to(l.get(w).scalar_type()), packed, group, l.get(sz));
    return bias.defined() ? out + bias : out;
  }
  return at::linear(x, l.get(w), bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt);
}

// Several int4 layers concatenated along their outputs (lean_decode._Fused): one kernel call.
std::vector<at::Tensor> fused(const at::Tensor& x, const Layer& l, int64_t q, int64_t sz, int64_t bias_slot,
                              at::IntArrayRef sizes, int64_t group) {
  at::Tensor out = int4_mm(x, l.get(q), group, l.get(sz));
  at::Tensor bias = l.get(bias_slot);
  if (bias.defined()) out = out + bias;
  return out.split_with_sizes(sizes, -1);
}

at::Tensor rotate_half(const at::Tensor& x) {
  int64_t half = x.size(-1) / 2;
  return at::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
}

// One half of transformers' apply_rotary_pos_emb for one head: (x * cos) + (rotated * sin),
// where rotated is -x[half:] for the first half and x[:half] for the second (rotate_half; the
// negation is exact). Each of the three ATen operations rounds once; so does this loop.
template <typename D>
CHATVLM_CLONES void rope_half_loop(const typename D::raw* __restrict x, const typename D::raw* __restrict other,
                                   float sign, const typename D::raw* __restrict c,
                                   const typename D::raw* __restrict s, typename D::raw* __restrict out,
                                   int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float a = D::load(D::store(D::load(x[i]) * D::load(c[i])));
    const float b = D::load(D::store((sign * D::load(other[i])) * D::load(s[i])));
    out[i] = D::store(a + b);
  }
}

// x and out (rows, heads, 1, dim), cos and sin (rows, 1, 1, dim); the last dimension packed.
template <typename D>
void rope_into(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& out) {
  using raw = typename D::raw;
  const int64_t rows = x.size(0), heads = x.size(1), half = x.size(3) / 2;
  const raw* xp = reinterpret_cast<const raw*>(x.data_ptr());
  const raw* cp = reinterpret_cast<const raw*>(cos.data_ptr());
  const raw* sp = reinterpret_cast<const raw*>(sin.data_ptr());
  raw* op = reinterpret_cast<raw*>(out.data_ptr());
  for (int64_t r = 0; r < rows; ++r) {
    const raw* c = cp + r * cos.stride(0);
    const raw* s = sp + r * sin.stride(0);
    for (int64_t hd = 0; hd < heads; ++hd) {
      const raw* in = xp + r * x.stride(0) + hd * x.stride(1);
      raw* o = op + r * out.stride(0) + hd * out.stride(1);
      rope_half_loop<D>(in, in + half, -1.0f, c, s, o, half);
      rope_half_loop<D>(in + half, in, 1.0f, c + half, s + half, o + half, half);
    }
  }
}

bool rope_fusable(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& out) {
  const auto t = x.scalar_type();
  auto packed_last = [&](const at::Tensor& a) {
    return a.dim() == 4 && a.scalar_type() == t && a.size(3) == x.size(3) && a.stride(3) == 1;
  };
  return (t == at::kBFloat16 || t == at::kFloat) && packed_last(x) && packed_last(cos) && packed_last(sin) &&
         (!out.defined() || (packed_last(out) && out.sizes() == x.sizes())) && x.size(2) == 1 &&
         x.size(3) % 2 == 0 && cos.size(0) == x.size(0) && sin.size(0) == x.size(0) && cos.size(1) == 1 &&
         sin.size(1) == 1 && cos.size(2) == 1 && sin.size(2) == 1;
}

// transformers' apply_rotary_pos_emb for one query position, into ``out`` (or a new tensor
// when it is undefined): (x * cos) + (rotate_half(x) * sin).
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor out = at::Tensor()) {
  if (!rope_fusable(x, cos, sin, out)) {
    at::Tensor rotated = (x * cos) + (rotate_half(x) * sin);
    return out.defined() ? out.copy_(rotated) : rotated;
  }
  if (!out.defined()) out = at::empty(x.sizes(), x.options());
  if (x.scalar_type() == at::kBFloat16) rope_into<Bf16>(x, cos, sin, out);
  else rope_into<F32>(x, cos, sin, out);
  return out;
}

at::Tensor decode_layers(at::Tensor h, const at::Tensor& cos, const at::Tensor& sin,
                         const std::optional<at::Tensor>& mask, const Slots& slots, int64_t used,
                         int64_t head_dim, int64_t n_rep, double scaling, at::ArrayRef<double> eps,
                         int64_t gemv_rows, int64_t group, at::OptionalIntArrayRef starts, int64_t packed_rows) {
  const int64_t rows = h.size(0);
  const int64_t layers = static_cast<int64_t>(slots.size()) / STRIDE;
  TORCH_CHECK(static_cast<int64_t>(slots.size()) == layers * STRIDE, "decode_layers: bad slot count");
  TORCH_CHECK(static_cast<int64_t>(eps.size()) == 2 * layers, "decode_layers: bad eps count");
  const std::vector<int64_t> shape = {rows, 1, -1, head_dim};
  // A boolean mask becomes the additive one SDPA would make of it in every layer (0 where
  // attended, -inf elsewhere, in the query's dtype): once per step instead.
  std::optional<at::Tensor> mask_once = mask;
  if (mask.has_value() && mask->scalar_type() == at::kBool)
    mask_once = at::where(*mask, at::scalar_tensor(0.0, h.options()),
                          at::scalar_tensor(-std::numeric_limits<double>::infinity(), h.options()));
  for (int64_t i = 0; i < layers; ++i) {
    Layer l{slots, i * STRIDE};
    at::Tensor x = rms_norm(h, l.get(IN_NORM), eps[2 * i]);
    at::Tensor q, k, v;
    const Path qkv_path = choose(l, QKV_INT4, QKV_PK, rows, gemv_rows, packed_rows);
    std::vector<int64_t> qkv_sizes = {l.get(Q_W).size(0), l.get(K_W).size(0), l.get(V_W).size(0)};
    if (qkv_path == Path::INT4) {
      auto parts = fused(x, l, QKV_INT4, QKV_SZ, QKV_BIAS, qkv_sizes, group);
      q = parts[0]; k = parts[1]; v = parts[2];
    } else if (qkv_path == Path::PACKED) {
      auto parts = packed_linear(x, l.get(QKV_PK), l.get(QKV_PB)).split_with_sizes(qkv_sizes, -1);
      q = parts[0]; k = parts[1]; v = parts[2];
    } else {
      q = project(x, l, Q_W, Q_B, Q_INT4, Q_SZ, gemv_rows, group);
      k = project(x, l, K_W, K_B, K_INT4, K_SZ, gemv_rows, group);
      v = project(x, l, V_W, V_B, V_INT4, V_SZ, gemv_rows, group);
    }
    q = q.view(shape).transpose(1, 2);
    k = k.view(shape).transpose(1, 2);
    v = v.view(shape).transpose(1, 2);
    q = rope(q, cos, sin);
    // The cache layer's buffer has room (the caller made sure): write this step's position, as
    // kv_cache.GrowingLayer.update does (the rotated keys straight into it), and attend over
    // the used part.
    at::Tensor kbuf = l.get(K_BUF), vbuf = l.get(V_BUF);
    rope(k, cos, sin, kbuf.slice(2, used, used + 1));
    vbuf.slice(2, used, used + 1).copy_(v);
    at::Tensor keys = kbuf.slice(2, 0, used + 1), values = vbuf.slice(2, 0, used + 1);
    // transformers' sdpa_attention_forward for one query position: grouped heads packed into the
    // query with a mask, enable_gqa without one. With ``starts``, each row attends to its own
    // positions only (from its first real one): its padding is never read.
    at::Tensor out;
    if (starts.has_value() && (out = attend_from(q, keys, values, *starts, n_rep, scaling)).defined()) {
      // (this file's kernel: each key read once per group, long rows split over the threads)
    } else if (starts.has_value()) {
      std::vector<at::Tensor> per_row;
      per_row.reserve(rows);
      for (int64_t r = 0; r < rows; ++r) {
        int64_t from = (*starts)[r];
        per_row.push_back(at::scaled_dot_product_attention(
            q.slice(0, r, r + 1), keys.slice(0, r, r + 1).slice(2, from), values.slice(0, r, r + 1).slice(2, from),
            std::nullopt, 0.0, false, scaling, n_rep > 1));
      }
      out = at::cat(per_row, 0);
    } else if (n_rep > 1 && mask_once.has_value()) {
      at::Tensor packed = q.reshape({q.size(0), q.size(1) / n_rep, n_rep, q.size(3)});
      at::Tensor m = *mask_once;
      if (m.size(1) != 1) m = m.reshape({m.size(0), m.size(1) / n_rep, n_rep, m.size(3)});
      out = at::scaled_dot_product_attention(packed, keys, values, m, 0.0, false, scaling, false);
    } else {
      out = at::scaled_dot_product_attention(q, keys, values, mask_once, 0.0, false, scaling, n_rep > 1);
    }
    out = out.reshape({out.size(0), -1, 1, values.size(-1)}).transpose(1, 2).contiguous();
    h = h + project(out.reshape({rows, -1}), l, O_W, O_B, O_INT4, O_SZ, gemv_rows, group, O_PK, packed_rows);
    x = rms_norm(h, l.get(POST_NORM), eps[2 * i + 1]);
    at::Tensor gate, up;
    const Path gu_path = choose(l, GU_INT4, GU_PK, rows, gemv_rows, packed_rows);
    std::vector<int64_t> gu_sizes = {l.get(G_W).size(0), l.get(U_W).size(0)};
    if (gu_path == Path::INT4) {
      auto parts = fused(x, l, GU_INT4, GU_SZ, GU_BIAS, gu_sizes, group);
      gate = parts[0]; up = parts[1];
    } else if (gu_path == Path::PACKED) {
      auto parts = packed_linear(x, l.get(GU_PK), l.get(GU_PB)).split_with_sizes(gu_sizes, -1);
      gate = parts[0]; up = parts[1];
    } else {
      gate = project(x, l, G_W, G_B, G_INT4, G_SZ, gemv_rows, group);
      up = project(x, l, U_W, U_B, U_INT4, U_SZ, gemv_rows, group);
    }
    h = h + project(at::silu(gate) * up, l, D_W, D_B, D_INT4, D_SZ, gemv_rows, group, D_PK, packed_rows);
  }
  return h;
}

// torch.argmax(logits, -1) for a (rows, vocab) bf16 or fp32 matrix: the first index of each
// row's largest value, or of its first NaN when it has one (argmax takes NaN as the largest).
// The sampler's greedy path (engine/sampling.py): for 16 rows of a 49,152-token vocabulary
// ATen's takes ~1.2 ms here (on fp32), this ~0.4 ms.
constexpr int64_t ARGMAX_LANES = 16;
typedef float Lanes __attribute__((vector_size(ARGMAX_LANES * sizeof(float))));
typedef int32_t LaneFlags __attribute__((vector_size(ARGMAX_LANES * sizeof(int32_t))));

template <typename D>
Lanes load_lanes(const typename D::raw* x) {
  Lanes v;
  for (int64_t j = 0; j < ARGMAX_LANES; ++j) v[j] = D::load(x[j]);
  return v;
}

// Each lane's largest value and whether it met a NaN, over whole blocks of ARGMAX_LANES.
template <typename D>
CHATVLM_CLONES void argmax_lanes(const typename D::raw* __restrict x, int64_t blocks, float* __restrict best_out,
                                 int* __restrict nan_out) {
  Lanes best = Lanes{} - std::numeric_limits<float>::infinity();
  LaneFlags nan = LaneFlags{};
  for (int64_t i = 0; i < blocks * ARGMAX_LANES; i += ARGMAX_LANES) {
    const Lanes v = load_lanes<D>(x + i);
    best = v > best ? v : best;
    nan |= v != v;
  }
  for (int64_t j = 0; j < ARGMAX_LANES; ++j) best_out[j] = best[j], nan_out[j] = nan[j];
}

// The first index holding ``top`` (or the first NaN), a block at a time.
template <typename D>
CHATVLM_CLONES int64_t first_index(const typename D::raw* __restrict x, int64_t n, float top, bool want_nan) {
  int64_t i = 0;
  for (; i + ARGMAX_LANES <= n; i += ARGMAX_LANES) {
    const Lanes v = load_lanes<D>(x + i);
    const LaneFlags hit = want_nan ? v != v : v == top;
    bool any = false;
    for (int64_t j = 0; j < ARGMAX_LANES; ++j) any |= hit[j] != 0;
    if (any) break;
  }
  for (; i < n; ++i) {
    const float v = D::load(x[i]);
    if (want_nan ? v != v : v == top) return i;
  }
  return 0;
}

template <typename D>
int64_t argmax_row(const typename D::raw* x, int64_t n) {
  float best[ARGMAX_LANES];
  int nan[ARGMAX_LANES];
  for (int64_t j = 0; j < ARGMAX_LANES; ++j) best[j] = -std::numeric_limits<float>::infinity(), nan[j] = 0;
  const int64_t blocks = n / ARGMAX_LANES;
  argmax_lanes<D>(x, blocks, best, nan);
  float top = -std::numeric_limits<float>::infinity();
  bool any_nan = false;
  for (int64_t j = 0; j < ARGMAX_LANES; ++j) top = best[j] > top ? best[j] : top, any_nan |= nan[j] != 0;
  for (int64_t i = blocks * ARGMAX_LANES; i < n; ++i) {
    const float v = D::load(x[i]);
    top = v > top ? v : top;
    any_nan |= v != v;
  }
  return first_index<D>(x, n, top, any_nan);
}

std::vector<int64_t> argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.size(1) > 0 &&
                  (logits.scalar_type() == at::kBFloat16 || logits.scalar_type() == at::kFloat),
              "argmax_rows: a contiguous (rows, vocab) bf16 or fp32 matrix");
  const int64_t rows = logits.size(0), n = logits.size(1);
  std::vector<int64_t> out(rows);
  for (int64_t r = 0; r < rows; ++r) {
    if (logits.scalar_type() == at::kBFloat16)
      out[r] = argmax_row<Bf16>(reinterpret_cast<const uint16_t*>(logits.data_ptr()) + r * n, n);
    else
      out[r] = argmax_row<F32>(logits.data_ptr<float>() + r * n, n);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(chatvlm_native, m) {
  m.def("slot_stride() -> int", []() -> int64_t { return STRIDE; });
  m.def("argmax_rows(Tensor logits) -> int[]", &argmax_rows);
  m.def("fast_kernels() -> bool", []() -> bool { return fast_kernels(); });
  m.def("int4_layout() -> int", []() -> int64_t {
#ifdef CHATVLM_X86_KERNELS
    return int4_layout();
#else
    return 0;
#endif
  });
  m.def("parallel_workers(int items) -> int", &parallel_workers);
  m.def("int4_mm(Tensor x, Tensor packed, int group, Tensor sz) -> Tensor", &int4_mm);
  m.def("int8_mm(Tensor x, Tensor w, Tensor scales) -> Tensor", &int8_mm);
  m.def("attend_from(Tensor q, Tensor keys, Tensor values, int[] starts, int n_rep, float scaling) -> Tensor?",
        [](const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, at::IntArrayRef starts,
           int64_t n_rep, double scaling) -> std::optional<at::Tensor> {
          at::Tensor out = attend_from(q, keys, values, starts, n_rep, scaling);
          return out.defined() ? std::optional<at::Tensor>(out) : std::nullopt;
        });
  // The fused element-wise parts on their own, for the tests (tests/engine/test_native_step.py).
  m.def("rms_norm(Tensor h, Tensor weight, float eps) -> Tensor", &rms_norm);
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor",
        [](const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) { return rope(x, cos, sin); });
  m.def("decode_layers(Tensor h, Tensor cos, Tensor sin, Tensor? mask, Tensor?[] slots, int used, "
        "int head_dim, int n_rep, float scaling, float[] eps, int gemv_rows, int group, int[]? starts, "
        "int packed_rows) -> Tensor",
        &decode_layers);
}
