"""Render the OCR sample images in samples/ together with their expected text.

    .venv/bin/python scripts/make_samples.py [--out samples]

Everything is drawn with Pillow from fixed strings, so the output is the same on every
run (for a given Pillow build): no randomness, no timestamps, no metadata besides the
EXIF Orientation tag of the rotated JPEG.

Fonts (Debian packages): fonts-dejavu-core for Latin and Cyrillic, fonts-noto-cjk for
Chinese. ``expected.json`` maps each file name to {"text", "language"}; lines of the text
are joined with "\\n" and the columns of a receipt line with one space.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "samples"

DEJAVU_CANDIDATES = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
)
NOTO_CJK_CANDIDATES = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
)
NOTO_CJK_SC_FACE = "Noto Sans CJK SC"

EXIF_ORIENTATION_TAG = 0x0112
EXIF_ROTATE_90_CW = 6  # "the stored image must be turned 90 degrees clockwise to display"

# A receipt line is either a plain string (left aligned) or (left, right) columns.
Row = str | tuple[str, str]

RECEIPT_EN: list[Row] = [
    "CORNER MARKET",
    "12 Harbour Street, Leeds",
    "Receipt No. 004417",
    "Date: 2025-03-14 10:42",
    ("Milk 2L", "1.45"),
    ("Wholemeal bread", "1.20"),
    ("Free range eggs x6", "2.35"),
    ("Cheddar 400g", "3.80"),
    ("Bananas 1.2kg", "0.96"),
    ("Subtotal", "9.76"),
    ("VAT 0%", "0.00"),
    ("TOTAL", "9.76"),
    ("Card payment", "9.76"),
    "Thank you for shopping with us!",
]

# Russian with the Latin a Russian receipt usually carries (brand names, USB-C).
RECEIPT_RU: list[Row] = [
    "ООО «Ромашка»",
    "г. Москва, ул. Ленина, д. 15",
    "Кассовый чек № 2817",
    "Дата: 14.03.2025 10:42",
    ("Молоко 3,2% 1 л", "89,90"),
    ("Хлеб бородинский", "54,00"),
    ("Яйца С1, 10 шт.", "119,50"),
    ("Сыр российский", "349,00"),
    ("Кабель USB-C 1 м", "299,00"),
    ("ИТОГО", "911,40"),
    ("Оплата картой", "911,40"),
    "Спасибо за покупку!",
]

LINE_ZH = "今天天气很好，我们去公园散步。"

DOC_ZH: list[Row] = [
    "欢迎使用本地文字识别服务",
    "发票号码：12345678",
    "开票日期：2025年3月14日",
    "合计金额：人民币九十八元整",
    "请妥善保管您的收据。",
]

LINE_RU = "Привет, мир! Проверка распознавания текста."

EXIF_EN: list[Row] = [
    "ORIENTATION TEST",
    "This page was scanned sideways.",
    "Apply the EXIF tag to read it.",
]


@dataclass(frozen=True)
class Sample:
    name: str
    language: str
    text: str
    image: Image.Image
    exif_orientation: int | None = None


def find_font(candidates: tuple[str, ...], fallback_glob: str) -> Path:
    for c in candidates:
        if Path(c).is_file():
            return Path(c)
    hits = sorted(Path("/usr/share/fonts").rglob(fallback_glob))
    if hits:
        return hits[0]
    raise SystemExit(f"font not found ({fallback_glob}); apt-get install fonts-dejavu-core fonts-noto-cjk")


def dejavu(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(find_font(DEJAVU_CANDIDATES, "DejaVuSans.ttf")), size)


def noto_sc(size: int) -> ImageFont.FreeTypeFont:
    path = find_font(NOTO_CJK_CANDIDATES, "NotoSansCJK-Regular.ttc")
    for index in range(16):  # a .ttc holds JP, KR, SC, TC, HK faces; pick Simplified Chinese
        try:
            font = ImageFont.truetype(str(path), size, index=index)
        except OSError:
            break
        if font.getname()[0] == NOTO_CJK_SC_FACE:
            return font
    return ImageFont.truetype(str(path), size)


def row_text(row: Row) -> str:
    return row if isinstance(row, str) else f"{row[0]} {row[1]}"


def render_rows(rows: list[Row], font: ImageFont.FreeTypeFont, width: int,
                margin: int = 32, line_gap: float = 1.6) -> Image.Image:
    """Left-aligned lines, with a right-aligned second column (prices) where given."""
    ascent, descent = font.getmetrics()
    step = int((ascent + descent) * line_gap)
    height = 2 * margin + step * len(rows)
    img = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(img)
    y = margin
    for row in rows:
        if isinstance(row, str):
            draw.text((margin, y), row, font=font, fill=0)
        else:
            left, right = row
            draw.text((margin, y), left, font=font, fill=0)
            draw.text((width - margin, y), right, font=font, fill=0, anchor="ra")
        y += step
    return img


def render_line(text: str, font: ImageFont.FreeTypeFont, pad: int = 24) -> Image.Image:
    x0, y0, x1, y1 = font.getbbox(text)
    img = Image.new("L", (x1 - x0 + 2 * pad, y1 - y0 + 2 * pad), 255)
    ImageDraw.Draw(img).text((pad - x0, pad - y0), text, font=font, fill=0)
    return img


def build_samples() -> list[Sample]:
    samples = [
        Sample("receipt_en.png", "en", "\n".join(map(row_text, RECEIPT_EN)),
               render_rows(RECEIPT_EN, dejavu(24), 640)),
        Sample("receipt_ru.png", "ru", "\n".join(map(row_text, RECEIPT_RU)),
               render_rows(RECEIPT_RU, dejavu(24), 640)),
        Sample("line_zh.png", "zh", LINE_ZH, render_line(LINE_ZH, noto_sc(40))),
        Sample("doc_zh.png", "zh", "\n".join(map(row_text, DOC_ZH)),
               render_rows(DOC_ZH, noto_sc(30), 640)),
        Sample("line_ru.png", "ru", LINE_RU, render_line(LINE_RU, dejavu(36))),
    ]
    upright = render_rows(EXIF_EN, dejavu(28), 640).convert("RGB")
    # Stored turned 90 degrees counter-clockwise; Orientation 6 tells the reader to turn it
    # back clockwise, so only ImageOps.exif_transpose() makes it readable.
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    samples.append(Sample("exif_rotated_en.jpg", "en", "\n".join(map(row_text, EXIF_EN)),
                          stored, exif_orientation=EXIF_ROTATE_90_CW))
    return samples


def write_samples(out: Path) -> dict[str, dict]:
    out.mkdir(parents=True, exist_ok=True)
    expected: dict[str, dict] = {}
    for s in build_samples():
        path = out / s.name
        if s.name.endswith(".jpg"):
            exif = Image.Exif()
            exif[EXIF_ORIENTATION_TAG] = s.exif_orientation or 1
            s.image.save(path, "JPEG", quality=90, exif=exif.tobytes())
        else:
            s.image.save(path, "PNG", optimize=True)
        entry = {"text": s.text, "language": s.language}
        if s.exif_orientation is not None:
            entry["exif_orientation"] = s.exif_orientation
        expected[s.name] = entry
    (out / "expected.json").write_text(
        json.dumps(expected, ensure_ascii=False, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return expected


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    expected = write_samples(args.out)
    for name in sorted(expected):
        p = args.out / name
        with Image.open(p) as im:
            print(f"{name:24s} {im.size[0]:5d}x{im.size[1]:<5d} {p.stat().st_size:8d} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
