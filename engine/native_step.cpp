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
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

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
    at::Tensor out = at::_weight_int4pack_mm_for_cpu(x.to(l.get(w).scalar_type()), packed, group, l.get(sz));
    return bias.defined() ? out + bias : out;
  }
  return at::linear(x, l.get(w), bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt);
}

// Several int4 layers concatenated along their outputs (lean_decode._Fused): one kernel call.
std::vector<at::Tensor> fused(const at::Tensor& x, const Layer& l, int64_t q, int64_t sz, int64_t bias_slot,
                              at::IntArrayRef sizes, int64_t group) {
  at::Tensor out = at::_weight_int4pack_mm_for_cpu(x, l.get(q), group, l.get(sz));
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
    if (starts.has_value()) {
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
  // The fused element-wise parts on their own, for the tests (tests/engine/test_native_step.py).
  m.def("rms_norm(Tensor h, Tensor weight, float eps) -> Tensor", &rms_norm);
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor",
        [](const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) { return rope(x, cos, sin); });
  m.def("decode_layers(Tensor h, Tensor cos, Tensor sin, Tensor? mask, Tensor?[] slots, int used, "
        "int head_dim, int n_rep, float scaling, float[] eps, int gemv_rows, int group, int[]? starts, "
        "int packed_rows) -> Tensor",
        &decode_layers);
}
