"""The blocks of a page drawn on its image: boxes coloured by category, numbered in reading order."""
from __future__ import annotations

import io

from PIL import Image, ImageDraw, ImageFont

from core.types import OcrBlock

_COLOURS = {
    None: (220, 40, 40), "text": (220, 40, 40), "title": (128, 0, 200), "section-header": (180, 60, 200),
    "list-item": (0, 140, 200), "table": (0, 160, 80), "formula": (230, 130, 0), "picture": (120, 120, 120),
    "caption": (200, 160, 0), "footnote": (90, 90, 160), "page-header": (100, 100, 100),
    "page-footer": (100, 100, 100),
}
_OTHER = (255, 0, 128)


def colour_of(category: str | None) -> tuple[int, int, int]:
    return _COLOURS.get(category.strip().lower() if category else None, _OTHER)


def _legend(draw: ImageDraw.ImageDraw, size: tuple[int, int], categories: list[str], font) -> None:
    """A key in the top-right corner: one swatch per category the page's blocks carry, in first-seen order."""
    names = list(dict.fromkeys(categories))
    if not names:
        return
    boxes = [draw.textbbox((0, 0), n, font=font) for n in names]
    th = max(b[3] - b[1] for b in boxes) + 6
    tw = max(b[2] - b[0] for b in boxes)
    sw = th  # swatch side
    width, height = tw + sw + 18, th * len(names) + 8
    x0, y0 = max(0, size[0] - width - 4), 4
    draw.rectangle((x0, y0, x0 + width, y0 + height), fill=(255, 255, 255), outline=(0, 0, 0))
    for i, (name, b) in enumerate(zip(names, boxes)):
        y = y0 + 4 + i * th
        draw.rectangle((x0 + 5, y + 2, x0 + 5 + sw - 4, y + sw - 2), fill=colour_of(name))
        draw.text((x0 + sw + 10 - b[0], y + 3 - b[1]), name, fill=(0, 0, 0), font=font)


def annotate(image: Image.Image, blocks: list[OcrBlock]) -> bytes:
    """PNG bytes of the image with each block's box and its reading order (as in the JSON, from 0) drawn on it."""
    canvas = image.convert("RGB")  # a copy: the caller's image is left as it was
    draw = ImageDraw.Draw(canvas)
    width = max(1, round(max(canvas.size) / 500))
    font = ImageFont.load_default(size=max(14, round(max(canvas.size) / 60)))
    for number, block in enumerate(blocks):
        if block.box is None:
            continue
        x1, y1, x2, y2 = block.box  # type: ignore[misc]
        colour = colour_of(block.category)
        draw.rectangle((x1, y1, max(x1, x2), max(y1, y2)), outline=colour, width=width)
        label = str(number)
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        tw, th = right - left + 4, bottom - top + 4
        lx, ly = x1, max(0, y1 - th)
        draw.rectangle((lx, ly, lx + tw, ly + th), fill=colour)
        draw.text((lx + 2 - left, ly + 2 - top), label, fill=(255, 255, 255), font=font)
    _legend(draw, canvas.size, [b.category for b in blocks if b.category], font)
    out = io.BytesIO()
    canvas.save(out, "PNG", optimize=False, compress_level=3)
    return out.getvalue()
