"""Document pages of known structure, for the doc_cpu quality benchmark and the end-to-end tests.

Every page is described once (blocks with their category, text and box; tables with their cells)
and drawn twice from that description: as pixels with Pillow (a "scanned" page: PNG, or a PDF of
images with no text layer) and as a born-digital PDF with fpdf2 (a real text layer, embedded fonts,
ruling lines as vector paths). The ground truth is the description itself, so nothing here is
tuned on what the pipeline answers.

    python scripts/make_doc_pages.py OUT_DIR [--seed 7] [--pages 12] [--three-column 6]

writes OUT_DIR/<name>.png, <name>.pdf (text layer, en/ru), <name>.scan.pdf and truth.json.
"""
from __future__ import annotations

import argparse
import io
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

DPI = 150
PAGE_PT = (595.0, 842.0)  # A4
PX = DPI / 72.0

FONTS = {
    "latin": ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"),
    "han": ("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc", "/usr/share/fonts/opentype/noto/NotoSansCJK-Bold.ttc"),
}

WORDS = {
    "en": ("report market station garden window river council budget energy transport school water "
           "planning housing museum library harbour street bridge annual growth service public local "
           "review project design network quality health safety record member office region data").split(),
    "ru": ("отчёт рынок станция сад окно река совет бюджет энергия транспорт школа вода план жильё "
           "музей библиотека гавань улица мост годовой рост служба город район проект сеть качество "
           "здоровье работа запись участник офис регион данные").split(),
    "zh": list("报告市场车站花园窗口河流议会预算能源交通学校水资源规划住房博物馆图书馆港口街道桥梁年度增长服务公共地方审查项目设计网络质量健康安全记录成员办公区域数据"),
}
TITLES = {"en": "Annual Report of the City Council", "ru": "Годовой отчёт городского совета",
          "zh": "城市议会年度报告"}
SECTIONS = {"en": ["Introduction", "Budget and Spending", "Transport", "Housing", "Results", "Outlook"],
            "ru": ["Введение", "Бюджет и расходы", "Транспорт", "Жильё", "Результаты", "Перспективы"],
            "zh": ["引言", "预算与支出", "交通运输", "住房建设", "工作成果", "未来展望"]}
HEADS = {"en": ("Item", "Plan", "Actual", "Year"), "ru": ("Статья", "План", "Факт", "Год"),
         "zh": ("项目", "计划", "实际", "年度")}


@dataclass
class Cell:
    row: int
    col: int
    rowspan: int
    colspan: int
    text: str
    box: list[int]


@dataclass
class TruthBlock:
    category: str           # dots.ocr's categories
    text: str
    box: list[int]          # page pixels at DPI
    cells: list[Cell] = field(default_factory=list)
    ruled: bool = False


@dataclass
class PageSpec:
    name: str
    language: str
    two_column: bool
    blocks: list[TruthBlock] = field(default_factory=list)  # in reading order
    # drawing operations in points: ("text", x, y, size, bold, s), ("line", x1, y1, x2, y2) and
    # ("rect", x1, y1, x2, y2, grey) (a filled bar of a chart)
    ops: list[tuple] = field(default_factory=list)
    columns: int = 1        # the most columns side by side on the page (1, 2 or 3)


def _font(language: str, bold: bool, size_px: float) -> ImageFont.FreeTypeFont:
    path = FONTS["han" if language == "zh" else "latin"][1 if bold else 0]
    return ImageFont.truetype(path, max(6, round(size_px)))


def _width_pt(text: str, language: str, size: float, bold: bool = False) -> float:
    return _font(language, bold, size * PX).getlength(text) / PX


class _Writer:
    """Lays blocks out top to bottom in one frame (a page or a column) and records truth and ops."""

    def __init__(self, spec: PageSpec, x: float, width: float, y: float) -> None:
        self.spec, self.x, self.width, self.y = spec, x, width, y

    def _wrap(self, text: str, size: float, width: float) -> list[str]:
        lang = self.spec.language
        units = list(text) if lang == "zh" else text.split(" ")
        sep = "" if lang == "zh" else " "
        lines, cur = [], ""
        for u in units:
            cand = (cur + sep + u) if cur else u
            if _width_pt(cand, lang, size) > width and cur:
                lines.append(cur)
                cur = u
            else:
                cur = cand
        return lines + ([cur] if cur else [])

    def text_block(self, category: str, text: str, size: float, bold: bool = False, indent: float = 0,
                   gap: float = 10) -> None:
        lines = self._wrap(text, size, self.width - indent)
        top = self.y
        for line in lines:
            self.spec.ops.append(("text", self.x + indent, self.y, size, bold, line))
            self.y += size * 1.45
        w = max(_width_pt(line, self.spec.language, size, bold) for line in lines)
        box = _px_box(self.x + indent, top, self.x + indent + w, top + (len(lines) - 1) * size * 1.45 + size * 1.2)
        sep = "" if self.spec.language == "zh" else " "
        self.spec.blocks.append(TruthBlock(category, sep.join(lines), box))
        self.y += gap

    def figure(self, width: float, height: float, rng: random.Random, bars: int = 6) -> None:
        """A bar chart without text (axes and filled bars), centred in the frame."""
        x0 = self.x + (self.width - width) / 2
        top, bottom = self.y, self.y + height
        self.spec.ops.append(("line", x0, top, x0, bottom))
        self.spec.ops.append(("line", x0, bottom, x0 + width, bottom))
        n = bars
        step = (width - 10) / n
        for i in range(n):
            bar_top = top + rng.uniform(0.05, 0.7) * height
            self.spec.ops.append(("rect", x0 + 10 + i * step, bar_top, x0 + 10 + i * step + step * 0.6, bottom,
                                  rng.choice((60, 110, 160))))
        self.spec.blocks.append(TruthBlock("Picture", "", _px_box(x0, top, x0 + width, bottom)))
        self.y = bottom + 8

    def table(self, rows: list[list[str]], ruled: bool, span_header: str | None, size: float = 10) -> None:
        """A table; with ``span_header`` a first header row whose cell spans every column but the first."""
        ncol = len(rows[0])
        col_w = self.width / ncol
        row_h = size * 2.2
        top = self.y
        grid: list[tuple[int, int, int, int, str]] = []  # row, col, rowspan, colspan, text
        r0 = 0
        if span_header:
            grid.append((0, 0, 2, 1, rows[0][0]))
            grid.append((0, 1, 1, ncol - 1, span_header))
            for c in range(1, ncol):
                grid.append((1, c, 1, 1, rows[0][c]))
            r0 = 2
        else:
            for c in range(ncol):
                grid.append((0, c, 1, 1, rows[0][c]))
            r0 = 1
        for i, row in enumerate(rows[1:]):
            for c, t in enumerate(row):
                grid.append((r0 + i, c, 1, 1, t))
        nrows = r0 + len(rows) - 1
        cells = []
        for r, c, rs, cs, t in grid:
            x1, y1 = self.x + c * col_w, top + r * row_h
            x2, y2 = x1 + cs * col_w, y1 + rs * row_h
            tw = _width_pt(t, self.spec.language, size, bold=r < r0)
            tx = x1 + 6 if not ruled or c == 0 else x1 + 6
            ty = (y1 + y2) / 2 - size * 0.6
            self.spec.ops.append(("text", tx, ty, size, r < r0, t))
            cells.append(Cell(r, c, rs, cs, t, _px_box(tx, ty, tx + tw, ty + size * 1.2)))
        bottom = top + nrows * row_h
        if ruled:  # every rule, skipping the inside of spanning cells
            for r in range(nrows + 1):
                y = top + r * row_h
                if span_header and r == 1:
                    self.spec.ops.append(("line", self.x + col_w, y, self.x + self.width, y))
                else:
                    self.spec.ops.append(("line", self.x, y, self.x + self.width, y))
            for c in range(ncol + 1):
                x = self.x + c * col_w
                if span_header and 1 < c < ncol:
                    self.spec.ops.append(("line", x, top + row_h, x, bottom))
                else:
                    self.spec.ops.append(("line", x, top, x, bottom))
        else:  # a borderless table: one rule under the header at most
            self.spec.ops.append(("line", self.x, top + r0 * row_h, self.x + self.width, top + r0 * row_h))
        text = "\n".join(" | ".join(t for r_, _, _, _, t in grid if r_ == r) for r in range(nrows))
        self.spec.blocks.append(TruthBlock("Table", text, _px_box(self.x, top, self.x + self.width, bottom),
                                           cells, ruled))
        self.y = bottom + 14


def _px_box(x1: float, y1: float, x2: float, y2: float) -> list[int]:
    return [round(x1 * PX), round(y1 * PX), round(x2 * PX), round(y2 * PX)]


CAPTION_LABELS = {"en": ("Figure", "Table"), "ru": ("Рисунок", "Таблица"), "zh": ("图", "表")}


def _caption(rng: random.Random, lang: str, kind: str, number: int) -> str:
    label = CAPTION_LABELS[lang][0 if kind == "figure" else 1]
    words = [rng.choice(WORDS[lang]) for _ in range(6 if lang == "zh" else 4)]
    if lang == "zh":
        return f"{label}{number} " + "".join(words)
    return f"{label} {number}. " + " ".join(words).capitalize()


def _sentence(rng: random.Random, lang: str, n: int) -> str:
    words = [rng.choice(WORDS[lang]) for _ in range(n)]
    if lang == "zh":
        return "".join(words) + "。"
    s = " ".join(words)
    return s[0].upper() + s[1:] + "."


def _paragraph(rng: random.Random, lang: str, sentences: int = 3) -> str:
    n = 14 if lang == "zh" else 8
    return ("" if lang == "zh" else " ").join(_sentence(rng, lang, n) for _ in range(sentences))


def _page_head(spec: PageSpec, index: int, language: str, margin: float, width: float) -> "_Writer":
    """The page header line and, on every third page, the title; returns the writer below them."""
    head = _Writer(spec, margin, width, 28)
    head.text_block("Page-header", {"en": "City Council", "ru": "Городской совет", "zh": "城市议会"}[language]
                    + f" · {2020 + index}", 8, gap=18)
    w = _Writer(spec, margin, width, head.y)
    if index % 3 == 0:
        w.text_block("Title", TITLES[language], 20, bold=True, gap=16)
    return w


def make_page(index: int, language: str, two_column: bool, seed: int = 7, columns: int | None = None) -> PageSpec:
    """One page: header, title (first page only), numbered sections, paragraphs, a list, a ruled
    table with a spanning header, a borderless table, a footer; optionally a two-column body.
    ``columns=3`` makes a three-column page instead (see three_column_page)."""
    if columns == 3:
        return three_column_page(index, language, seed)
    rng = random.Random(seed * 1000 + index)
    spec = PageSpec(f"doc_{language}_{index:02d}{'_2col' if two_column else ''}", language, two_column,
                    columns=2 if two_column else 1)
    margin, width = 50.0, PAGE_PT[0] - 100.0
    w = _page_head(spec, index, language, margin, width)
    sections = SECTIONS[language]
    number = 1 + (index % 3)
    w.text_block("Section-header", f"{number}. {sections[index % len(sections)]}", 13, bold=True)
    w.text_block("Text", _paragraph(rng, language), 10)
    for k in range(3):
        w.text_block("List-item", f"• {_sentence(rng, language, 4 if language != 'zh' else 8)}", 10, indent=12,
                     gap=4)
    w.y += 8
    heads = HEADS[language]
    rows = [list(heads)] + [[rng.choice(WORDS[language]) + ("" if language == "zh" else ""), str(rng.randint(10, 99)),
                             str(rng.randint(10, 99)), str(2018 + r)] for r in range(3)]
    span = {"en": "Amount, thousands", "ru": "Сумма, тыс.", "zh": "金额（千元）"}[language]
    w.text_block("Section-header", f"{number}.1 {sections[(index + 1) % len(sections)]}", 13, bold=True)
    w.text_block("Caption", _caption(rng, language, "table", index + 1), 9, gap=6)
    w.table(rows, ruled=True, span_header=span)
    if two_column:
        colw = (width - 20) / 2
        left, right = _Writer(spec, margin, colw, w.y), _Writer(spec, margin + colw + 20, colw, w.y)
        for col in (left, right):
            col.text_block("Section-header", f"{number}.{2 if col is left else 3} "
                           f"{sections[(index + (2 if col is left else 3)) % len(sections)]}", 12, bold=True)
            col.text_block("Text", _paragraph(rng, language, 4), 10)
            col.text_block("Text", _paragraph(rng, language, 2), 10)
        w.y = max(left.y, right.y) + 6
    else:
        w.text_block("Section-header", f"{number}.2 {sections[(index + 2) % len(sections)]}", 13, bold=True)
        w.text_block("Text", _paragraph(rng, language, 4), 10)
        brows = [[rng.choice(WORDS[language]), str(rng.randint(100, 999)), str(rng.randint(100, 999))]
                 for _ in range(4)]
        w.table([[heads[0], heads[1], heads[2]]] + brows, ruled=False, span_header=None)
    w.y += 6
    w.figure(min(width, 260.0), 110.0, rng)
    fig_caption = _caption(rng, language, "figure", index + 1)
    w.text_block("Caption", fig_caption, 9, indent=(width - _width_pt(fig_caption, language, 9)) / 2)
    foot = _Writer(spec, margin, width, PAGE_PT[1] - 40)
    foot.text_block("Page-footer", f"— {index + 1} —", 8, gap=0)
    return spec


def _fitting(sections: list[str], start: int, prefix: str, language: str, size: float, width: float) -> str:
    """The first section name from ``start`` on whose numbered heading fits on one line of ``width``."""
    for k in range(len(sections)):
        name = sections[(start + k) % len(sections)]
        if _width_pt(f"{prefix} {name}", language, size, bold=True) <= width:
            return f"{prefix} {name}"
    raise ValueError("no section name fits the column")


def three_column_page(index: int, language: str, seed: int = 7) -> PageSpec:
    """A three-column page, in reading order: page header; a full-width band (the title on the
    first page of three, a section header, a paragraph); three columns, each a section header and
    a paragraph, the middle one with a bar chart and its caption below it; a full-width section
    header and paragraph between the column bands; three more columns, the last holding a
    captioned ruled table; the page footer."""
    rng = random.Random(seed * 1000 + 500 + index)
    spec = PageSpec(f"doc_{language}_{index:02d}_3col", language, False, columns=3)
    margin, width, gutter = 50.0, PAGE_PT[0] - 100.0, 16.0
    colw = (width - 2 * gutter) / 3
    sections = SECTIONS[language]
    number = 1 + (index % 3)
    w = _page_head(spec, index, language, margin, width)
    w.text_block("Section-header", f"{number}. {sections[index % len(sections)]}", 13, bold=True)
    wide = 4 if language == "zh" else 2  # sentences of a full-width paragraph: two lines or more
    w.text_block("Text", _paragraph(rng, language, wide), 10, gap=14)

    def band(sub: int, last: str | None) -> float:
        cols = [_Writer(spec, margin + k * (colw + gutter), colw, w.y) for k in range(3)]
        for k, col in enumerate(cols):  # written column after column: the truth's reading order
            col.text_block("Section-header", _fitting(sections, index + sub + k, f"{number}.{sub + k}", language,
                                                       12, colw), 12, bold=True)
            col.text_block("Text", _paragraph(rng, language, 3 if k != 1 else 2), 10)
            if k == 1 and last == "figure":
                col.y += 4
                col.figure(colw - 20, 70.0, rng, bars=4)
                cap = _caption(rng, language, "figure", index + 1)
                fits = _width_pt(cap, language, 9) <= colw
                col.text_block("Caption", cap, 9, indent=(colw - _width_pt(cap, language, 9)) / 2 if fits else 0)
            if k == 2 and last == "table":
                col.y += 4
                col.text_block("Caption", _caption(rng, language, "table", index + 1), 9, gap=6)
                heads = HEADS[language]
                col.table([[heads[0], heads[1]]] + [[rng.choice(WORDS[language])[:8], str(rng.randint(10, 99))]
                                                    for _ in range(3)], ruled=True, span_header=None, size=9)
        return max(c.y for c in cols) + 6

    w.y = band(1, "figure")
    w.text_block("Section-header", f"{number}.4 {sections[(index + 4) % len(sections)]}", 13, bold=True)
    w.text_block("Text", _paragraph(rng, language, wide + 1), 10, gap=14)
    w.y = band(5, "table")
    if w.y > PAGE_PT[1] - 50:
        raise ValueError(f"{spec.name} runs into the footer")
    foot = _Writer(spec, margin, width, PAGE_PT[1] - 40)
    foot.text_block("Page-footer", f"— {index + 1} —", 8, gap=0)
    return spec


def draw_png(spec: PageSpec) -> Image.Image:
    img = Image.new("RGB", (round(PAGE_PT[0] * PX), round(PAGE_PT[1] * PX)), "white")
    d = ImageDraw.Draw(img)
    for op in spec.ops:
        if op[0] == "text":
            _, x, y, size, bold, s = op
            d.text((x * PX, y * PX), s, fill="black", font=_font(spec.language, bold, size * PX))
        elif op[0] == "rect":
            _, x1, y1, x2, y2, grey = op
            d.rectangle((x1 * PX, y1 * PX, x2 * PX, y2 * PX), fill=(grey, grey, grey))
        else:
            _, x1, y1, x2, y2 = op
            d.line((x1 * PX, y1 * PX, x2 * PX, y2 * PX), fill="black", width=2)
    return img


def draw_pdf(specs: list[PageSpec]) -> bytes:
    """A born-digital PDF (text layer, embedded fonts) of the pages; Latin and Cyrillic only."""
    from fpdf import FPDF

    pdf = FPDF(unit="pt", format=PAGE_PT)
    pdf.set_auto_page_break(False)
    pdf.add_font("dv", "", FONTS["latin"][0])
    pdf.add_font("dv", "B", FONTS["latin"][1])
    for spec in specs:
        pdf.add_page()
        pdf.set_line_width(1)
        for op in spec.ops:
            if op[0] == "text":
                _, x, y, size, bold, s = op
                pdf.set_font("dv", "B" if bold else "", size)
                # fpdf2's text() takes the baseline; Pillow's y is the top of the ascent.
                pdf.text(x, y + size * 0.93, s)
            elif op[0] == "rect":
                _, x1, y1, x2, y2, grey = op
                pdf.set_fill_color(grey)
                pdf.rect(x1, y1, x2 - x1, y2 - y1, style="F")
            else:
                _, x1, y1, x2, y2 = op
                pdf.line(x1, y1, x2, y2)
    return bytes(pdf.output())


def scanned_pdf(images: list[Image.Image]) -> bytes:
    out = io.BytesIO()
    images[0].save(out, "PDF", save_all=True, append_images=images[1:], resolution=DPI)
    return out.getvalue()


def quality_set(n: int = 12, seed: int = 7, three: int = 0) -> list[PageSpec]:
    """n pages spread over en/zh/ru, half of them two-column, then ``three`` three-column pages."""
    langs = ("en", "zh", "ru")
    return [make_page(i, langs[i % 3], two_column=(i // 3) % 2 == 1, seed=seed) for i in range(n)] + \
        [three_column_page(i, langs[i % 3], seed=seed) for i in range(three)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--pages", type=int, default=12)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--three-column", type=int, default=6, help="three-column pages added to the set")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    specs = quality_set(args.pages, args.seed, args.three_column)
    truth = {}
    for spec in specs:
        img = draw_png(spec)
        img.save(args.out / f"{spec.name}.png")
        (args.out / f"{spec.name}.scan.pdf").write_bytes(scanned_pdf([img]))
        if spec.language != "zh":
            (args.out / f"{spec.name}.pdf").write_bytes(draw_pdf([spec]))
        truth[spec.name] = {"language": spec.language, "two_column": spec.two_column, "columns": spec.columns,
                            "blocks": [asdict(b) for b in spec.blocks]}
    (args.out / "truth.json").write_text(json.dumps(truth, ensure_ascii=False, indent=1), encoding="utf-8")
    print(f"wrote {len(specs)} pages to {args.out}")


if __name__ == "__main__":
    main()
