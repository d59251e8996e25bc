"""Image inputs of a batch: the vision tower's features computed ahead of prefill (on the
engine's vision worker, engine/vision.py) or pixels fed to the prefill forward, the CPU threads
the two share, and Qwen-VL's multimodal RoPE positions.

A mixin of engine/backend.py's BatchBackend.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from core.cores import set_torch_threads
from engine.prompts import EncodedPrompt, ImageFeatures

TOY_MODEL_PARAMS = 5_000_000  # below this a model's steps are too small to split across threads


class ImageInputs:
    """BatchBackend's image inputs: features ahead of prefill, the threads they use, mRoPE."""

    vision_ahead = True  # adapters may turn it off: images then run inside the prefill forward

    @functools.cached_property
    def encodes_images_ahead(self) -> bool:
        """Whether image features are computed before prefill (``encode_images``), e.g. on the
        engine's vision worker, and passed to the prefill forward instead of pixels."""
        inner = getattr(self.model, "model", None)
        return (self.mrope and self.vision_ahead and hasattr(inner, "get_image_features")
                and "mm_encoder_outputs" in inspect.signature(self.model.forward).parameters)

    def bind_vision_thread(self, decoding_rows: int, requests: int) -> bool:
        """Called on the vision worker before each call; returns whether the decode steps should
        wait for it. Idle engine, or a model that encodes on one thread anyway: all the vision
        threads, beside the decoding. As many requests waiting for their images as there are
        rows decoding, or more: all the threads, and the rows wait (they all join sooner that
        way). Fewer: one thread, beside the decode steps, which then run on one thread fewer
        (``share_cores``), so the streams do not stall."""
        if self.device.type != "cpu":
            return False
        full = min(self._vision_threads, self._engine_threads or self._vision_threads)  # the model's share now
        exclusive = decoding_rows > 0 and full > 1 and requests >= decoding_rows
        set_torch_threads(1 if decoding_rows and not exclusive else full)
        return exclusive

    def share_cores(self, vision_busy: bool) -> None:
        """Called on the engine's thread before a step: while the vision worker runs (on one
        thread), decode on one thread fewer, so the two never ask for more cores than there are."""
        self._vision_busy = vision_busy
        self._apply_threads()

    def use_threads(self, threads: int) -> None:
        """Called on the engine's thread: decode on ``threads`` threads (fewer than
        ``bind_thread`` chose while other models generate too; core/cores.py)."""
        self._engine_threads = threads
        self._apply_threads()

    def _apply_threads(self) -> None:
        if self.device.type != "cpu":
            return
        if self._engine_threads is None:
            self._engine_threads = torch.get_num_threads()  # what ``bind_thread`` chose
        threads = self._engine_threads
        set_torch_threads(max(1, threads - 1) if self._vision_busy else threads)

    _engine_threads: int | None = None
    _vision_busy = False

    @functools.cached_property
    def _vision_threads(self) -> int:
        if self.threads:
            return self.threads
        params = sum(p.numel() for p in self.model.parameters())
        return 1 if params < TOY_MODEL_PARAMS else _cpu_threads()  # as ``bind_thread`` decides

    @torch.inference_mode()
    def encode_images(self, prompts: list[EncodedPrompt]) -> None:
        """Run the vision tower once over every image of these prompts; each prompt keeps its
        own features (``prompt.features``) and drops its pixels."""
        todo = [p for p in prompts if p.vision and p.features is None]
        if not todo:
            return
        pixels = {key: torch.cat([p.vision[key] for p in todo]).to(self.device)
                  for key in ("pixel_values", "image_grid_thw")}
        out = self.model.model.get_image_features(pixels["pixel_values"].to(self.model.dtype),
                                                  pixels["image_grid_thw"], return_dict=True)
        deep = getattr(out, "deepstack_features", None)
        first = 0
        for p in todo:
            n = len(p.vision["image_grid_thw"])
            p.features = ImageFeatures(type(out), list(out.pooler_output[first:first + n]),
                                       [list(layer[first:first + n]) for layer in deep] if deep else None)
            p.vision = {k: v for k, v in p.vision.items() if k != "pixel_values"}
            first += n

    def _encoded_inputs(self, with_images: list[EncodedPrompt]) -> dict[str, Any]:
        """The precomputed features of these prompts, in row order, as the model's forward takes
        them (``mm_encoder_outputs``), with the image grids for the multimodal RoPE positions."""
        self.encode_images(with_images)  # any prompt that did not pass the vision worker
        pooled = [f for p in with_images for f in p.features.pooled]
        fields: dict[str, Any] = {"pooler_output": tuple(pooled)}
        if with_images[0].features.deepstack is not None:
            layers = len(with_images[0].features.deepstack)
            fields["deepstack_features"] = [tuple(f for p in with_images for f in p.features.deepstack[i])
                                            for i in range(layers)]
        grids = torch.cat([p.vision["image_grid_thw"] for p in with_images]).to(self.device)
        return {"mm_encoder_outputs": {"image": with_images[0].features.output_type(**fields)},
                "image_grid_thw": grids}

    def _vision_inputs(self, prompts: list[EncodedPrompt]) -> dict[str, Any]:
        """The prompts' image inputs concatenated in row order: the models scatter image features
        into their image-token positions row-major, so that order is the batch's token order."""
        with_images = [p for p in prompts if p.vision]
        kwargs: dict[str, torch.Tensor] = {}
        if not with_images:
            return kwargs
        if self.encodes_images_ahead:
            return self._encoded_inputs(with_images)
        for key in with_images[0].vision:
            kwargs[key] = torch.cat([p.vision[key] for p in with_images]).to(self.device)
        if "pixel_values" in kwargs:
            kwargs["pixel_values"] = kwargs["pixel_values"].to(self.model.dtype)
        return kwargs

    def _mrope_positions(self, prompts, ids, mask, kwargs):
        with_images = [p for p in prompts if p.vision]
        if not with_images:
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            return pos.unsqueeze(0).expand(3, -1, -1), torch.zeros((len(prompts), 1), dtype=torch.long, device=self.device)
        types = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            if p.mm_token_type_ids:
                types[i, ids.shape[1] - len(p.mm_token_type_ids):] = torch.tensor(p.mm_token_type_ids)
        kwargs.update(self._vision_inputs(with_images))
        kwargs["mm_token_type_ids"] = types
        position_ids, deltas = self.model.model.get_rope_index(
            ids, mm_token_type_ids=types, image_grid_thw=kwargs.get("image_grid_thw"), attention_mask=mask)
        return position_ids, deltas.to(self.device).long()


def _cpu_threads() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
