"""Input side of dots.ocr: image preprocessing (Qwen2-VL's scheme with patch 14, merge 2 and
temporal patch 1), the chat framing and the prompt modes.

Each image becomes ``<|img|>`` + one ``<|imgpad|>`` per merged 28x28 patch + ``<|endofimg|>``,
placed before the text of its turn, and its pixels become rows of flattened patches listed
merge window by merge window, which is the order the vision tower's rotary and merger expect.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

PATCH = 14
MERGE = 2
FACTOR = PATCH * MERGE  # one image token covers a FACTOR x FACTOR square
MIN_PIXELS = 3136
MAX_PIXELS = 11_289_600
# OpenAI CLIP statistics, as Qwen2-VL's processor (and the published preprocessor_config.json) use.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT = 200

IMG_START, IMG_PAD, IMG_END = "<|img|>", "<|imgpad|>", "<|endofimg|>"
USER, END_USER, ASSISTANT, END_ASSISTANT = "<|user|>", "<|endofuser|>", "<|assistant|>", "<|endofassistant|>"
SYSTEM, END_SYSTEM = "<|system|>", "<|endofsystem|>"
SPECIAL_TOKENS = (IMG_START, IMG_PAD, IMG_END, USER, END_USER, ASSISTANT, END_ASSISTANT)

# The model's prompt modes, verbatim: it was trained on exactly these instructions.
PROMPT_LAYOUT_ALL = """Please output the layout information from the PDF image, including each layout element's bbox, its category, and the corresponding text content within the bbox.

1. Bbox format: [x1, y1, x2, y2]

2. Layout Categories: The possible categories are ['Caption', 'Footnote', 'Formula', 'List-item', 'Page-footer', 'Page-header', 'Picture', 'Section-header', 'Table', 'Text', 'Title'].

3. Text Extraction & Formatting Rules:
    - Picture: For the 'Picture' category, the text field should be omitted.
    - Formula: Format its text as LaTeX.
    - Table: Format its text as HTML.
    - All Others (Text, Title, etc.): Format their text as Markdown.

4. Constraints:
    - The output text must be the original text from the image, with no translation.
    - All layout elements must be sorted according to human reading order.

5. Final Output: The entire output must be a single JSON object.
"""
PROMPT_LAYOUT_ONLY = ("Please output the layout information from this PDF image, including each layout's bbox and "
                      "its category. The bbox should be in the format [x1, y1, x2, y2]. The layout categories for the "
                      "PDF document include ['Caption', 'Footnote', 'Formula', 'List-item', 'Page-footer', "
                      "'Page-header', 'Picture', 'Section-header', 'Table', 'Text', 'Title']. Do not output the "
                      "corresponding text. The layout result should be in JSON format.")
PROMPT_OCR = "Extract the text content from this image."
PROMPT_GROUNDING = "Extract text from the given bounding box on the image (format: [x1, y1, x2, y2]).\nBounding Box:\n"

PROMPTS = {"layout_all": PROMPT_LAYOUT_ALL, "layout_only": PROMPT_LAYOUT_ONLY, "ocr": PROMPT_OCR,
           "grounding": PROMPT_GROUNDING}


def smart_resize(width: int, height: int, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                 factor: int = FACTOR) -> tuple[int, int]:
    """(width, height) rounded to multiples of ``factor`` with min_pixels <= w*h <= max_pixels, aspect kept."""
    if max(width, height) / max(1, min(width, height)) > MAX_ASPECT:
        raise ValueError(f"aspect ratio above {MAX_ASPECT}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return w, h


@dataclass
class ImageInput:
    pixel_values: np.ndarray        # (grid_h * grid_w, 3 * PATCH * PATCH) float32
    grid_thw: tuple[int, int, int]  # (1, grid_h, grid_w) in patches
    size: tuple[int, int]           # resized (width, height): the model's box coordinates live here

    @property
    def tokens(self) -> int:
        """Image tokens after the 2x2 merge."""
        return self.grid_thw[1] * self.grid_thw[2] // (MERGE * MERGE)


def preprocess(image: Image.Image, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
               mean=IMAGE_MEAN, std=IMAGE_STD) -> ImageInput:
    """Resize to multiples of 28 within the pixel budget, normalise, and cut into patch rows."""
    image = image.convert("RGB")
    w, h = smart_resize(*image.size, min_pixels=min_pixels, max_pixels=max_pixels)
    if (w, h) != image.size:
        image = image.resize((w, h), Image.Resampling.BICUBIC)
    x = np.asarray(image, dtype=np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    gh, gw = h // PATCH, w // PATCH
    # (H, W, C) -> (gh/m, m, P, gw/m, m, P, C) -> (gh/m, gw/m, m, m, C, P, P): merge windows stay contiguous.
    x = x.reshape(gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH, 3).transpose(0, 3, 1, 4, 6, 2, 5)
    rows = np.ascontiguousarray(x.reshape(gh * gw, 3 * PATCH * PATCH))
    return ImageInput(rows, (1, gh, gw), (w, h))


def image_placeholder(image: ImageInput) -> str:
    return IMG_START + IMG_PAD * image.tokens + IMG_END


def format_chat(turns: list[tuple[str, str]]) -> str:
    """The published chat framing: ``<|user|>..<|endofuser|><|assistant|>``; system turns are plain text
    markers (they are not tokens of the vocabulary)."""
    out = []
    for i, (role, text) in enumerate(turns):
        if role == "system":
            out.append(f"{SYSTEM}{text}{END_SYSTEM}\n")
        elif role == "assistant":
            out.append(f"{ASSISTANT}{text}" + (END_ASSISTANT if i < len(turns) - 1 else ""))
        else:
            out.append(f"{USER}{text}{END_USER}")
    if not turns or turns[-1][0] != "assistant":
        out.append(ASSISTANT)
    return "".join(out)


def grounding_prompt(region: tuple[int, int, int, int], page_size: tuple[int, int], resized: tuple[int, int]) -> str:
    """The grounding instruction with the box moved from page pixels into the resized image's pixels."""
    sx, sy = resized[0] / page_size[0], resized[1] / page_size[1]
    x1, y1, x2, y2 = region
    box = [round(x1 * sx), round(y1 * sy), round(x2 * sx), round(y2 * sy)]
    box = [min(max(v, 0), lim) for v, lim in zip(box, (resized[0], resized[1]) * 2)]
    return PROMPT_GROUNDING + str(box)
