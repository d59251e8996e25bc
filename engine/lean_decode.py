"""A lean decode step for Llama-architecture models (SmolLM2, Llama, TinyLlama, Qwen2/2.5): the
same tensor operations as transformers' eager forward, in the same order, without its
per-module machinery. The engine takes it for steps of up to GEMV_ROWS rows.

At batch 1 a 135M model's decode step is ~750 small tensor operations, and transformers' module
calls, keyword plumbing, output records and per-layer reshapes add CPU time around them (this
step measured 1.0-1.2x faster, docs/BENCHMARKS.md). It walks the layers directly, keeps the
hidden state as a (rows, hidden) matrix, and calls the int4 kernel straight. The attention mask
and the rotary cos/sin come from the model's own code once per step, and attention goes through
transformers' own SDPA function, so the logits are bitwise the ones of ``model(...)``
(tests/engine/test_lean_decode.py).

The q/k/v projections run as one int4 matmul and gate/up as another (their int4 copies
concatenated along the outputs: each output is still its own dot product over the same groups,
so the values do not change), which cuts the kernel calls per layer from 7 to 4.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine import native_step, packed
from engine.kv_cache import GrowingLayer
from engine.quant import INT4_GROUP, Int4WeightOnlyLinear, Int8WeightOnlyLinear, int4_pack, small_rows

log = logging.getLogger(__name__)

# Qwen2 is Llama with q/k/v biases (and optional sliding-window layers, which are not reproduced).
LEAN_MODEL_TYPES = frozenset({"llama", "qwen2"})


def lean_supported(model: Any) -> bool:
    """Whether ``model`` has the plain Llama layout this step reproduces exactly."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in LEAN_MODEL_TYPES:
        return False
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default" or getattr(config, "pretraining_tp", 1) != 1:
        return False
    if getattr(config, "_attn_implementation", None) != "sdpa" or getattr(config, "hidden_act", None) != "silu":
        return False
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return False
    inner = getattr(model, "model", None)
    return inner is not None and hasattr(inner, "layers") and hasattr(model, "lm_head")


class _Fused:
    """Several int4 layers' copies concatenated along their outputs: one kernel call for all.

    The tensors are non-persistent buffers of ``owner`` (the attention or MLP module): the
    model's memory figure counts them, they follow the model between devices, and a second
    backend over the same model reuses them."""

    def __init__(self, owner: nn.Module, layers: list[Int4WeightOnlyLinear]) -> None:
        self.owner = owner
        self.sizes = [l.out_features for l in layers]
        if getattr(owner, "lean_int4", None) is not None:
            return
        # Groups run along each output row, so packing the stacked weights gives every row the
        # same 4-bit values, scale and minimum as its own layer's copy.
        packed, scales_zeros, _ = int4_pack(torch.cat([l.weight for l in layers]))
        # A bias is added after the matmul, element by element, as each layer does it.
        bias = torch.cat([l.bias.detach() for l in layers]) if layers[0].bias is not None else None
        owner.register_buffer("lean_int4", packed, persistent=False)
        owner.register_buffer("lean_scales_zeros", scales_zeros, persistent=False)
        owner.register_buffer("lean_bias", bias, persistent=False)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        o = self.owner
        out = native_step.int4_mm(x, o.lean_int4, INT4_GROUP, o.lean_scales_zeros)
        if o.lean_bias is not None:
            out = out + o.lean_bias
        return list(out.split(self.sizes, dim=-1))


class LeanDecoder:
    """Runs decode steps (one new token per row) of a Llama-architecture model."""

    def __init__(self, model: Any, native: bool = True, packed_decode: object = "auto") -> None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import create_causal_mask

        self.model = model
        self.inner = model.model
        self.config = model.config
        self._mask_fn = create_causal_mask
        self._sdpa = sdpa_attention_forward
        self.head_dim = self.inner.layers[0].self_attn.head_dim
        self.fused_qkv: list[_Fused | None] = []
        self.fused_up: list[_Fused | None] = []
        for layer in self.inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv, up = [attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]
            self.fused_qkv.append(_fuse(attn, qkv))
            self.fused_up.append(_fuse(mlp, up))
        # The same layers compiled (engine/native_step.py), once built; None: the Python loop only.
        self.native = NativeLayers(self) if native and NativeLayers.supports(model) else None
        # Dense weights also reordered for oneDNN (engine/packed.py), read by the compiled
        # layers and the output head for steps of up to packed.PACKED_ROWS rows.
        self.packed = self.native is not None and packed.wanted(
            packed_decode, _dense_bytes(model), self.inner.layers[0].self_attn.o_proj.weight.dtype, model.device)
        # Packed here, at load, not in the first request's step (~2 s for a 135M model).
        self.head_packed = None
        if self.packed:
            try:
                self.head_packed = _packed_head(model.lm_head)
            except packed.PackMismatch as exc:
                self.unpack(exc)
        self.packed_rows = self._packed_rows()

    def compiled(self, cache: Any) -> bool:
        """Whether the next step over ``cache`` runs the compiled layers."""
        return self.native is not None and self.native.ready(cache)

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 cache: Any, starts: list[int] | None = None) -> torch.Tensor:
        """Next-token logits (rows, vocab) for ``ids`` (rows, 1), writing their KV into ``cache``.
        ``starts``: each row's first real position; it attends from there only, its padding is
        never read (the compiled layers only: ``compiled(cache)`` must hold)."""
        inner = self.inner
        embeds = inner.embed_tokens(ids)
        # Rows attending from their own first positions (``starts``) need no mask.
        mask = None if starts is not None else self._mask_fn(
            config=self.config, inputs_embeds=embeds, attention_mask=attention_mask, past_key_values=cache,
            position_ids=position_ids)
        cos, sin = inner.rotary_emb(embeds, position_ids=position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        rows = ids.shape[0]
        if starts is not None or self.compiled(cache):
            h = self.native(embeds.view(rows, -1), cos, sin, mask, cache, starts)
            return self._head(_rms_norm(h, inner.norm))
        few = rows <= small_rows(embeds.dtype)
        shape = (rows, 1, -1, self.head_dim)
        h = embeds.view(rows, -1)
        for i, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x = _rms_norm(h, layer.input_layernorm)
            fused = self.fused_qkv[i]
            if few and fused is not None:
                q, k, v = fused(x)
            else:
                q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            q = q.view(shape).transpose(1, 2)
            k = k.view(shape).transpose(1, 2)
            v = v.view(shape).transpose(1, 2)
            q = (q * cos) + (_rotate_half(q) * sin)
            k = (k * cos) + (_rotate_half(k) * sin)
            k, v = cache.update(k, v, attn.layer_idx)
            out, _ = self._sdpa(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling)
            h = h + attn.o_proj(out.reshape(rows, -1))
            x = _rms_norm(h, layer.post_attention_layernorm)
            fused = self.fused_up[i]
            if few and fused is not None:
                gate, up = fused(x)
            else:
                gate, up = mlp.gate_proj(x), mlp.up_proj(x)
            h = h + mlp.down_proj(F.silu(gate) * up)
        return self.model.lm_head(_rms_norm(h, inner.norm))

    def _packed_rows(self) -> list[list[torch.Tensor | None]] | None:
        """Every layer's packed weights, or None (packing off, or a packed weight gave other
        values than F.linear: then none is kept)."""
        if not self.packed:
            return None
        try:
            return [_packed_layer(layer.self_attn, layer.mlp) for layer in self.inner.layers]
        except packed.PackMismatch as exc:
            self.unpack(exc)
            return None

    def unpack(self, reason: Exception) -> None:
        """Decode from the plain weights (a packed one gave other values) and drop the copies."""
        log.warning("decoding from the plain weights: %s", reason)
        self.packed, self.head_packed, self.packed_rows = False, None, None
        modules = [self.model.lm_head] + [m for layer in self.inner.layers for m in (layer.self_attn, layer.mlp)]
        for module in modules:
            for name in [n for n in module._buffers if n.startswith(("lean_pk_", "lean_packed"))]:
                del module._buffers[name]

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """The output head as its module computes it, from the packed weight when there is one
        (not for the few rows the int8 head's own kernel takes)."""
        head, rows = self.model.lm_head, x.shape[0]
        if self.head_packed is None or rows > packed.PACKED_ROWS:
            return head(x)
        if isinstance(head, Int8WeightOnlyLinear):
            if rows <= small_rows(head.dense.dtype):
                return head(x)
            out = packed.linear(x.to(head.dense.dtype), self.head_packed)  # its ``flat @ dense.t()``
            return out if head.bias is None else out + head.bias
        return packed.linear(x, self.head_packed, head.bias)


def _dense_bytes(model: Any) -> int:
    """Bytes of the dense weights packing would copy: the projections and the output head."""
    total = 0
    for layer in model.model.layers:
        for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                  layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            total += m.weight.numel() * m.weight.element_size()
    head = _head_weight(model.lm_head)
    return total + (0 if head is None else head.numel() * head.element_size())


def _head_weight(head: nn.Module) -> torch.Tensor | None:
    return head.dense if isinstance(head, Int8WeightOnlyLinear) else getattr(head, "weight", None)


def _packed_head(head: nn.Module) -> torch.Tensor | None:
    """The output head's packed weight (a non-persistent buffer of the head, made once)."""
    if type(head) not in (nn.Linear, Int8WeightOnlyLinear) or _head_weight(head) is None:
        return None
    if getattr(head, "lean_packed", None) is None:
        bias = head.bias if type(head) is nn.Linear else None  # the int8 head adds its own after
        head.register_buffer("lean_packed", packed.pack_checked(_head_weight(head), bias), persistent=False)
    return head.lean_packed


def _packed_layer(attn: nn.Module, mlp: nn.Module) -> list[torch.Tensor | None]:
    """One layer's packed weights in the compiled step's order: q/k/v as one matrix and its
    biases, o, gate/up as one matrix and its biases, down. (Layers with a bias on o or down pass
    it with their plain slots, O_B and D_B.)"""
    return (_packed_into(attn, ("lean_pk_qkv", "lean_pk_qkv_bias", "lean_pk_o"),
                         [attn.q_proj, attn.k_proj, attn.v_proj], attn.o_proj)
            + _packed_into(mlp, ("lean_pk_gu", "lean_pk_gu_bias", "lean_pk_down"),
                           [mlp.gate_proj, mlp.up_proj], mlp.down_proj))


def _packed_into(owner: nn.Module, names: tuple[str, str, str], fused: list[nn.Module],
                 alone: nn.Module) -> list[torch.Tensor | None]:
    """``fused`` packed as one matrix, their biases, and ``alone`` packed: non-persistent
    buffers ``names`` of ``owner``, made once (counted in the model's memory, reused by a second
    backend over the same model)."""
    if getattr(owner, names[0], None) is None:
        bias = _cat_bias(fused)
        matrix = packed.pack_checked(torch.cat([m.weight for m in fused]), bias)
        single = packed.pack_checked(alone.weight, alone.bias)
        for name, tensor in zip(names, (matrix, bias, single)):
            owner.register_buffer(name, tensor, persistent=False)
    return [getattr(owner, name) for name in names]


def _cat_bias(projections: list[nn.Module]) -> torch.Tensor | None:
    if all(m.bias is None for m in projections):
        return None
    return torch.cat([m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features)
                      for m in projections])


def _fuse(owner: nn.Module, layers: list[nn.Module]) -> _Fused | None:
    if not all(isinstance(l, Int4WeightOnlyLinear) for l in layers):
        return None
    if len({l.bias is None for l in layers}) != 1:
        return None
    return _Fused(owner, layers)


def _rms_norm(h: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """transformers' LlamaRMSNorm, operation for operation (float32 inside)."""
    x = h.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + norm.variance_epsilon)
    return norm.weight * x.to(h.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class NativeLayers:
    """The decoder layers of a LeanDecoder as one call to the compiled step: the weights are
    packed once into the slot list engine/native_step.cpp reads; each step adds the cache
    layers' buffers (grown here first, as GrowingLayer.update would) and moves their ends."""

    @staticmethod
    def supports(model: Any) -> bool:
        """Every projection a plain or int4 Linear on the CPU (int8 layers keep the Python loop)."""
        if model.device.type != "cpu":
            return False
        for layer in model.model.layers:
            mods = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                    layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
            if not all(type(m) in (nn.Linear, Int4WeightOnlyLinear) for m in mods):
                return False
        return True

    def __init__(self, lean: "LeanDecoder") -> None:
        native_step.start_build()
        self.lean = lean
        self.slots: list[torch.Tensor | None] | None = None  # packed at the first native step
        self.eps: list[float] = []
        attn = lean.inner.layers[0].self_attn
        self.n_rep = int(getattr(attn, "num_key_value_groups", 1))
        self.scaling = float(attn.scaling)

    def ready(self, cache: Any) -> bool:
        if native_step.status() != "ready":
            return False
        layers = getattr(cache, "layers", ())
        return len(layers) == len(self.lean.inner.layers) and all(type(l) is GrowingLayer for l in layers)

    def _pack(self) -> None:
        stride = native_step.slot_stride()
        packed_rows = self.lean.packed_rows  # None when packing is off or was dropped
        slots: list[torch.Tensor | None] = []
        for i, layer in enumerate(self.lean.inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            qkv, up = self.lean.fused_qkv[i], self.lean.fused_up[i]
            row: list[torch.Tensor | None] = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
            row += [qkv.owner.lean_int4, qkv.owner.lean_scales_zeros, qkv.owner.lean_bias] if qkv else [None] * 3
            for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                row += _linear_slots(m)
            row += [up.owner.lean_int4, up.owner.lean_scales_zeros, up.owner.lean_bias] if up else [None] * 3
            for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                row += _linear_slots(m)
            row += packed_rows[i] if packed_rows else [None] * 6
            row += [None, None]  # this step's cache buffers
            assert len(row) == stride
            slots += row
            self.eps += [layer.input_layernorm.variance_epsilon, layer.post_attention_layernorm.variance_epsilon]
        self.stride, self.slots = stride, slots

    def __call__(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Any, cache: Any,
                 starts: list[int] | None = None) -> torch.Tensor:
        if self.slots is None:
            self._pack()
        slots, stride = list(self.slots), self.stride
        layers = cache.layers
        used = layers[0].used
        for i, layer in enumerate(layers):
            keys, values = layer.keys, layer.values
            if layer.used != used:
                raise RuntimeError("the cache layers hold different lengths")
            slots[i * stride + stride - 2], slots[i * stride + stride - 1] = layer.reserve(1, keys, values)
        h = native_step.decode_layers(h, cos, sin, mask if isinstance(mask, torch.Tensor) else None, slots, used,
                                      self.lean.head_dim, self.n_rep, self.scaling, self.eps, small_rows(h.dtype),
                                      INT4_GROUP, starts, packed.PACKED_ROWS if self.lean.packed else 0)
        for layer in layers:
            layer.advance(1)
        return h


def _linear_slots(m: nn.Module) -> list[torch.Tensor | None]:
    """(dense weight, bias, int4 copy, its scales and zeros) of a projection."""
    int4 = isinstance(m, Int4WeightOnlyLinear)
    return [m.weight, m.bias, m.weight_int4 if int4 else None, m.scales_zeros if int4 else None]
