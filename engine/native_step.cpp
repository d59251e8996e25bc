// The decoder layers of one lean decode step (engine/lean_decode.py) in C++: the same ATen
// operations, in the same order, on the same tensors, so the logits stay bitwise transformers'.
// What goes away is the Python interpreter between them: at one row a 135M model's step is
// ~1,500 small operations, and from Python each one costs more than its kernel.
//
// Built at first use by engine/native_step.py (torch.utils.cpp_extension); registered as
// torch.ops.chatvlm_native.decode_layers.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

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

// transformers' LlamaRMSNorm: float32 inside, the weight times the result in the input's dtype.
at::Tensor rms_norm(const at::Tensor& h, const at::Tensor& weight, double eps) {
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

at::Tensor decode_layers(at::Tensor h, const at::Tensor& cos, const at::Tensor& sin,
                         const std::optional<at::Tensor>& mask, const Slots& slots, int64_t used,
                         int64_t head_dim, int64_t n_rep, double scaling, at::ArrayRef<double> eps,
                         int64_t gemv_rows, int64_t group, at::OptionalIntArrayRef starts, int64_t packed_rows) {
  const int64_t rows = h.size(0);
  const int64_t layers = static_cast<int64_t>(slots.size()) / STRIDE;
  TORCH_CHECK(static_cast<int64_t>(slots.size()) == layers * STRIDE, "decode_layers: bad slot count");
  TORCH_CHECK(static_cast<int64_t>(eps.size()) == 2 * layers, "decode_layers: bad eps count");
  const std::vector<int64_t> shape = {rows, 1, -1, head_dim};
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
    q = (q * cos) + (rotate_half(q) * sin);
    k = (k * cos) + (rotate_half(k) * sin);
    // The cache layer's buffer has room (the caller made sure): write this step's position, as
    // kv_cache.GrowingLayer.update does, and attend over the used part.
    at::Tensor kbuf = l.get(K_BUF), vbuf = l.get(V_BUF);
    kbuf.slice(2, used, used + 1).copy_(k);
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
    } else if (n_rep > 1 && mask.has_value()) {
      at::Tensor packed = q.reshape({q.size(0), q.size(1) / n_rep, n_rep, q.size(3)});
      at::Tensor m = *mask;
      if (m.size(1) != 1) m = m.reshape({m.size(0), m.size(1) / n_rep, n_rep, m.size(3)});
      out = at::scaled_dot_product_attention(packed, keys, values, m, 0.0, false, scaling, false);
    } else {
      out = at::scaled_dot_product_attention(q, keys, values, mask, 0.0, false, scaling, n_rep > 1);
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

}  // namespace

TORCH_LIBRARY(chatvlm_native, m) {
  m.def("slot_stride() -> int", []() -> int64_t { return STRIDE; });
  m.def("decode_layers(Tensor h, Tensor cos, Tensor sin, Tensor? mask, Tensor?[] slots, int used, "
        "int head_dim, int n_rep, float scaling, float[] eps, int gemv_rows, int group, int[]? starts, "
        "int packed_rows) -> Tensor",
        &decode_layers);
}
