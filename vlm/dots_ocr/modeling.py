"""dots.ocr written natively: a Qwen2 causal LM with a vision tower whose image features take
the place of the ``<|imgpad|>`` token embeddings.

transformers has no dots.ocr class and the published remote code does not run on
transformers 5, so the architecture lives here. Parameter names match the published
checkpoint exactly (``vision_tower.*``, ``model.*``, ``lm_head``), so its safetensors load
as they are. The vision tower computes in whatever dtype it is loaded in (fp32 on the CPU,
bf16 on CUDA); only the norms and the rotary angles are taken in fp32.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig, Qwen2Config, Qwen2ForCausalLM


class DotsVisionConfig(PreTrainedConfig):
    model_type = "dots_vit"
    base_config_key = "vision_config"

    embed_dim: int = 1536
    hidden_size: int = 1536          # width handed to the language model (after the merger)
    intermediate_size: int = 4224
    num_hidden_layers: int = 42
    num_attention_heads: int = 12
    num_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 1
    rms_norm_eps: float = 1e-5
    use_bias: bool = False
    post_norm: bool = True


class DotsOCRConfig(Qwen2Config):
    """The published config: Qwen2's text keys at the top level plus ``vision_config``."""

    model_type = "dots_ocr"
    sub_configs_defaults = {"vision_config": DotsVisionConfig}

    vision_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 151665
    video_token_id: int = 151656


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * self.weight.float()).to(x.dtype)


class Patchifier(nn.Module):
    def __init__(self, cfg: DotsVisionConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cfg.num_channels, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.norm = RMSNorm(cfg.embed_dim, cfg.rms_norm_eps)


class PatchEmbed(nn.Module):
    """Flattened patches (N, C*T*P*P) -> (N, embed_dim); the temporal axis has size 1 here."""

    def __init__(self, cfg: DotsVisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patchifier = Patchifier(cfg)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        c, t, p = self.cfg.num_channels, self.cfg.temporal_patch_size, self.cfg.patch_size
        x = pixels.view(-1, c, t, p, p)[:, :, 0]
        x = self.patchifier.proj(x).view(-1, self.cfg.embed_dim)
        return self.patchifier.norm(x)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (N, heads, head_dim); cos/sin (N, head_dim)."""
    h = x.float()
    out = h * cos.unsqueeze(1) + _rotate_half(h) * sin.unsqueeze(1)
    return out.to(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, cfg: DotsVisionConfig) -> None:
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.embed_dim // cfg.num_attention_heads
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=cfg.use_bias)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=cfg.use_bias)

    def forward(self, x: torch.Tensor, cu_seqlens: list[int], cos: torch.Tensor, sin: torch.Tensor,
                use_flash: bool) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.heads, self.head_dim).unbind(1)
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        if use_flash:  # one varlen call over every image of the batch
            from flash_attn import flash_attn_varlen_func

            bounds = torch.tensor(cu_seqlens, dtype=torch.int32, device=x.device)
            longest = max(b - a for a, b in zip(cu_seqlens, cu_seqlens[1:]))
            out = flash_attn_varlen_func(q, k, v, bounds, bounds, longest, longest, causal=False)
        else:  # bidirectional within each image: one SDPA call per image, no cross-image mask needed
            pieces = []
            for a, b in zip(cu_seqlens, cu_seqlens[1:]):
                qi, ki, vi = (t[a:b].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
                pieces.append(F.scaled_dot_product_attention(qi, ki, vi)[0].transpose(0, 1))
            out = torch.cat(pieces)
        return self.proj(out.reshape(n, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: DotsVisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.intermediate_size, bias=cfg.use_bias)
        self.fc3 = nn.Linear(cfg.embed_dim, cfg.intermediate_size, bias=cfg.use_bias)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.embed_dim, bias=cfg.use_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)) * self.fc3(x))


class VisionBlock(nn.Module):
    def __init__(self, cfg: DotsVisionConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.embed_dim, cfg.rms_norm_eps)
        self.attn = VisionAttention(cfg)
        self.norm2 = RMSNorm(cfg.embed_dim, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cu_seqlens, cos, sin, use_flash):
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin, use_flash)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LayerNorm, then each merge window (m*m patches, adjacent in the input order) concatenated
    and projected to the language model's width."""

    def __init__(self, cfg: DotsVisionConfig) -> None:
        super().__init__()
        self.width = cfg.embed_dim * cfg.spatial_merge_size ** 2
        self.ln_q = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.width, self.width), nn.GELU(), nn.Linear(self.width, cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.width))


class DotsVisionTransformer(nn.Module):
    def __init__(self, cfg: DotsVisionConfig) -> None:
        super().__init__()
        if cfg.embed_dim % cfg.num_attention_heads or (cfg.embed_dim // cfg.num_attention_heads) % 4:
            raise ValueError("vision embed_dim / heads must be a multiple of 4 (2-D rotary)")
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_hidden_layers))
        if cfg.post_norm:
            self.post_trunk_norm = RMSNorm(cfg.embed_dim, cfg.rms_norm_eps)
        self.merger = PatchMerger(cfg)
        self.use_flash = False  # set by the owner when flash-attn serves this model on CUDA

    def rotary(self, grid_thw: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (N, head_dim): half the frequencies follow the patch row, half the column,
        with patches listed merge window by merge window (the processor's order)."""
        m = self.cfg.spatial_merge_size
        positions = []
        for t, h, w in grid_thw.tolist():
            rows = torch.arange(h).unsqueeze(1).expand(h, w)
            cols = torch.arange(w).unsqueeze(0).expand(h, w)
            pair = torch.stack([g.reshape(h // m, m, w // m, m).permute(0, 2, 1, 3).reshape(-1) for g in (rows, cols)], -1)
            positions.append(pair.repeat(t, 1))
        pos = torch.cat(positions).to(device)
        dim = self.cfg.embed_dim // self.cfg.num_attention_heads // 2
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
        angles = (pos.unsqueeze(-1).float() * inv_freq).flatten(1)  # (N, dim): row freqs then column freqs
        angles = torch.cat([angles, angles], -1)
        return angles.cos(), angles.sin()

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values.to(self.patch_embed.patchifier.proj.weight.dtype))
        cos, sin = self.rotary(grid_thw, x.device)
        sizes = [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]
        cu_seqlens = [0]
        for s in sizes:
            cu_seqlens.append(cu_seqlens[-1] + s)
        use_flash = self.use_flash and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
        for block in self.blocks:
            x = block(x, cu_seqlens, cos, sin, use_flash)
        if self.cfg.post_norm:
            x = self.post_trunk_norm(x)
        return self.merger(x)


class DotsOCRForCausalLM(Qwen2ForCausalLM):
    """Qwen2ForCausalLM (``model.*``, ``lm_head``) plus ``vision_tower``; plain 1-D positions."""

    config_class = DotsOCRConfig

    def __init__(self, config: DotsOCRConfig) -> None:
        super().__init__(config)
        self.vision_tower = DotsVisionTransformer(config.vision_config)
        self.vision_tower.use_flash = (config._attn_implementation == "flash_attention_2"
                                       and importlib.util.find_spec("flash_attn") is not None)
        self.post_init()

    def forward(self, input_ids=None, pixel_values=None, image_grid_thw=None, inputs_embeds=None, **kwargs):
        if pixel_values is not None and input_ids is not None:
            inputs_embeds = self.embed_with_images(input_ids, pixel_values, image_grid_thw)
            input_ids = None
        return super().forward(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)

    def embed_with_images(self, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                          image_grid_thw: torch.Tensor) -> torch.Tensor:
        """Token embeddings with each image's features written over its ``<|imgpad|>`` tokens."""
        embeds = self.model.embed_tokens(input_ids)
        features = self.vision_tower(pixel_values, image_grid_thw).to(embeds.dtype)
        slots = input_ids == self.config.image_token_id
        if int(slots.sum()) != features.shape[0]:
            raise ValueError(f"{int(slots.sum())} image tokens for {features.shape[0]} image features")
        return embeds.masked_scatter(slots.unsqueeze(-1), features)


# Keys of the published config.json that we read; anything else there (auto_map, the remote
# code's attention choice, training switches) is ignored.
_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps",
              "tie_word_embeddings", "rope_parameters", "rope_theta", "rope_scaling", "use_sliding_window",
              "sliding_window", "max_window_layers", "attention_dropout", "bos_token_id", "eos_token_id",
              "pad_token_id", "image_token_id", "video_token_id", "initializer_range")
_VISION_KEYS = tuple(DotsVisionConfig.__annotations__)


def config_from_published(raw: dict) -> DotsOCRConfig:
    """Our config from the published ``config.json`` (raises ValueError when it does not describe dots.ocr)."""
    if raw.get("model_type") != "dots_ocr":
        raise ValueError(f"model_type is {raw.get('model_type')!r}, not 'dots_ocr'")
    if raw.get("attention_bias") is False:
        raise ValueError("attention_bias false is not the dots.ocr language model")
    vision = raw.get("vision_config")
    if not isinstance(vision, dict):
        raise ValueError("vision_config is missing")
    text = {k: raw[k] for k in _TEXT_KEYS if k in raw}
    if text.get("rope_scaling") is None:
        text.pop("rope_scaling", None)
    return DotsOCRConfig(vision_config={k: vision[k] for k in _VISION_KEYS if k in vision}, **text)
