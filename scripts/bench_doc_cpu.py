"""Quality and speed of the CPU document pipeline (doc_cpu) on generated pages of known structure.

    python scripts/bench_doc_cpu.py [--pages 12] [--seed 7] [--three-column 6] [--job-pages 200] [--only quality] [--errors]

Starts a real server (no weights: RapidOCR, Tesseract, doc_cpu), sends the quality set made by
scripts/make_doc_pages.py (a seed the tests do not use), and prints:
* the issue's quality table (heading F1, ruled-table structure, cell text, two- and three-column
  reading order as Kendall tau, text CER per language), on scans (PNG) and on text-layer PDFs;
* pages/s of doc_cpu Markdown against plain RapidOCR text on the same scanned pages (one run,
  side by side), and of text-layer pages: the fast path (structure from the PDF) against the
  layout model (a second server with models.doc_cpu.options.text_layer_structure=false), in turn;
* the server's peak RSS during a long text-layer PDF job, and the CPU it uses running four
  jobs at once.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.make_doc_pages import PageSpec, draw_pdf, draw_png, quality_set, scanned_pdf  # noqa: E402
from tests.server_process import RemoteServer  # noqa: E402

HEADINGS = ("Title", "Section-header")
LANG = {"en": "English", "zh": "Chinese", "ru": "Russian"}


def norm(s: str) -> str:
    return "".join(s.split())


def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def sim(a: str, b: str) -> float:
    a, b = norm(a), norm(b)
    if not a and not b:
        return 1.0
    return 1 - levenshtein(a, b) / max(len(a), len(b))


def match(truth: list[str], got: list[str], threshold: float) -> list[tuple[int, int]]:
    """Greedy one-to-one matching by similarity."""
    pairs = sorted(((sim(t, g), i, j) for i, t in enumerate(truth) for j, g in enumerate(got)), reverse=True)
    used_t, used_g, out = set(), set(), []
    for s, i, j in pairs:
        if s >= threshold and i not in used_t and j not in used_g:
            used_t.add(i)
            used_g.add(j)
            out.append((i, j))
    return out


def kendall_tau(order: list[int]) -> float:
    n = len(order)
    if n < 2:
        return 1.0
    conc = disc = 0
    for i in range(n):
        for j in range(i + 1, n):
            if order[i] < order[j]:
                conc += 1
            else:
                disc += 1
    return (conc - disc) / (conc + disc)


def score_page(spec: PageSpec, blocks: list[dict], acc: dict) -> None:
    lang = spec.language
    # headings
    t_heads = [b.text for b in spec.blocks if b.category in HEADS_ALL]
    g_heads = [b["text"] for b in blocks if b["category"] in HEADINGS]
    m = match(t_heads, g_heads, 0.7)
    acc["head_tp"] += len(m)
    acc["head_fp"] += len(g_heads) - len(m)
    acc["head_fn"] += len(t_heads) - len(m)
    # tables
    tables = [b for b in blocks if b["category"] == "Table" and b.get("cells")]
    for tb in (b for b in spec.blocks if b.category == "Table"):
        want = sorted((c.row, c.col, c.rowspan, c.colspan) for c in tb.cells)
        best = max(tables, key=lambda g: _iou(tb.box, g["box"]), default=None)
        got_cells = {(c["row"], c["col"]): c for c in best["cells"]} if best and _iou(tb.box, best["box"]) > 0.5 else {}
        key = "ruled" if tb.ruled else "borderless"
        exact = best is not None and sorted((c["row"], c["col"], c["rowspan"], c["colspan"])
                                            for c in best["cells"]) == want and bool(got_cells)
        acc[f"{key}_n"] += 1
        acc[f"{key}_exact"] += exact
        for c in tb.cells:
            acc[f"{key}_cell_sims"].append(sim(c.text, got_cells[(c.row, c.col)]["text"])
                                           if (c.row, c.col) in got_cells else 0.0)
    # reading order on two- and three-column pages (body blocks, furniture left out)
    if spec.columns >= 2:
        t_body = [b.text for b in spec.blocks if not b.category.startswith("Page-") and b.category not in OBJECTS]
        g_body = [b for b in blocks if not (b["category"] or "").startswith("Page-") and b["category"] not in OBJECTS]
        pairs = sorted(match(t_body, [b["text"] for b in g_body], 0.6))
        acc[f"tau{spec.columns}"].append(kendall_tau([g_body[j]["reading_order"] for _, j in pairs]))
    # captions: found as Caption and read right beside their figure or table
    for k, tb in enumerate(spec.blocks):
        if tb.category != "Caption":
            continue
        obj = next(spec.blocks[j] for j in (k + 1, k - 1) if 0 <= j < len(spec.blocks)
                   and spec.blocks[j].category in OBJECTS)
        acc["caption_n"] += 1
        got = max(blocks, key=lambda g: sim(tb.text, g["text"]))
        if got["category"] != "Caption" or sim(tb.text, got["text"]) < 0.6:
            continue
        acc["caption_found"] += 1
        i = blocks.index(got)
        beside = [blocks[j] for j in (i - 1, i + 1) if 0 <= j < len(blocks)]
        acc["caption_beside"] += any(g["category"] in OBJECTS and _iou(obj.box, g["box"]) > 0.5 for g in beside)
    # text CER over the text blocks (tables are scored by their cells, figures carry no text)
    t_text = [b.text for b in spec.blocks if b.category not in OBJECTS]
    g_text = [b["text"] for b in blocks if b["category"] not in OBJECTS]
    for i, j in match(t_text, g_text, 0.3):
        t, g = norm(t_text[i]), norm(g_text[j])
        acc[f"cer_{lang}"].append((levenshtein(t, g), len(t)))
    for i in set(range(len(t_text))) - {i for i, _ in match(t_text, g_text, 0.3)}:
        acc[f"cer_{lang}"].append((len(norm(t_text[i])), len(norm(t_text[i]))))


HEADS_ALL = ("Title", "Section-header")
OBJECTS = ("Table", "Picture")


def _iou(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0, w) * max(0, h)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def new_acc() -> dict:
    acc = {k: 0 for k in ("head_tp", "head_fp", "head_fn", "ruled_n", "ruled_exact", "borderless_n",
                          "borderless_exact", "caption_n", "caption_found", "caption_beside")}
    acc.update({"ruled_cell_sims": [], "borderless_cell_sims": [], "tau2": [], "tau3": [], "cer_en": [], "cer_zh": [],
                "cer_ru": []})
    return acc


def report(acc: dict) -> dict:
    tp, fp, fn = acc["head_tp"], acc["head_fp"], acc["head_fn"]
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0

    def cer(key: str) -> float | None:
        pairs = acc[key]
        return sum(e for e, _ in pairs) / max(1, sum(n for _, n in pairs)) if pairs else None

    return {"heading_f1": round(f1, 3),
            "ruled_exact": f"{acc['ruled_exact']}/{acc['ruled_n']}",
            "ruled_cell_similarity": round(statistics.mean(acc["ruled_cell_sims"]), 3) if acc["ruled_cell_sims"] else None,
            "borderless_exact": f"{acc['borderless_exact']}/{acc['borderless_n']}",
            "borderless_cell_similarity": round(statistics.mean(acc["borderless_cell_sims"]), 3)
            if acc["borderless_cell_sims"] else None,
            "two_column_kendall_tau": round(statistics.mean(acc["tau2"]), 3) if acc["tau2"] else None,
            "three_column_kendall_tau": round(statistics.mean(acc["tau3"]), 3) if acc["tau3"] else None,
            "three_column_tau_min": round(min(acc["tau3"]), 3) if acc["tau3"] else None,
            "captions_found": f"{acc['caption_found']}/{acc['caption_n']}",
            "captions_beside_their_object": f"{acc['caption_beside']}/{acc['caption_n']}",
            "cer_en": _r(cer("cer_en")), "cer_zh": _r(cer("cer_zh")), "cer_ru": _r(cer("cer_ru"))}


def _r(v):
    return None if v is None else round(v, 4)


def post(server, data: bytes, name: str, **fields) -> tuple[dict, float]:
    t = time.perf_counter()
    r = requests.post(f"{server.url}/ocr", files={"file": (name, data)}, data=fields, timeout=600)
    r.raise_for_status()
    return r.json(), time.perf_counter() - t


def png(img) -> bytes:
    import io

    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


class Sampler:
    """Peak RSS and mean CPU of a process, sampled every 0.2 s."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.rss: list[int] = []
        self.cpu: list[float] = []
        self._stop = threading.Event()
        self.proc.cpu_percent(None)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            rss = self.proc.memory_info().rss
            self.rss.append(rss)
            self.peak = max(self.peak, rss)
            self.cpu.append(self.proc.cpu_percent(None))

    def stop(self) -> None:
        self._stop.set()
        self.thread.join()


def wait_job(server, job_id: str) -> dict:
    while True:
        body = requests.get(f"{server.url}/jobs/{job_id}", timeout=10).json()
        if body["status"] in ("succeeded", "failed", "cancelled"):
            return body
        time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=12)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--three-column", type=int, default=6, help="three-column pages added to the quality set")
    ap.add_argument("--job-pages", type=int, default=200)
    ap.add_argument("--only", choices=("quality", "speed", "jobs"), help="run one part only")
    ap.add_argument("--errors", action="store_true", help="print each text block the CER counts errors in")
    args = ap.parse_args()
    specs = quality_set(args.pages, args.seed, args.three_column)
    images = {s.name: draw_png(s) for s in specs}
    env = {"CHATVLM_LIMITS__REQUEST_TIMEOUT_S": "600", "CHATVLM_LIMITS__MAX_PDF_PAGES": "100",
           "CHATVLM_JOBS__MAX_PER_CLIENT": "8"}
    import tempfile

    # The text-layer fast path against the layout model on the same pages: a second server with
    # the fast path off (models.doc_cpu.options.text_layer_structure=false), asked in turn.
    old_env = {**env, "CHATVLM_MODELS__DOC_CPU__OPTIONS__TEXT_LAYER_STRUCTURE": "false"}
    with tempfile.TemporaryDirectory() as nw, RemoteServer(models_dir=Path(nw), env=env, startup_timeout=120) as server, \
            tempfile.TemporaryDirectory() as nw2, \
            RemoteServer(models_dir=Path(nw2), env=old_env, startup_timeout=120) as old:
        post(server, png(images[specs[0].name]), "warm.png", format="markdown")  # load every model once
        post(server, png(images[specs[0].name]), "warm.png")
        post(old, draw_pdf([specs[0]]), "warm.pdf", format="markdown", model="doc_cpu")
        results = {}
        if args.only in (None, "quality"):
            quality(server, specs, images, results, args.errors, old)
        # speed and jobs on the first --pages pages only, as measured before three-column pages
        if args.only in (None, "speed"):
            speed(server, specs[:args.pages], images, old)
        if args.only in (None, "jobs"):
            jobs(server, specs[:args.pages], images, args.job_pages)


def print_errors(spec: PageSpec, blocks: list[dict]) -> None:
    """The text blocks the CER counts errors in: truth against its matched answer, as edits."""
    import difflib

    truth = [b for b in spec.blocks if b.category not in OBJECTS]
    got = [b for b in blocks if b["category"] not in OBJECTS]
    pairs = dict(match([b.text for b in truth], [g["text"] for g in got], 0.3))
    for i, tb in enumerate(truth):
        t = norm(tb.text)
        if i not in pairs:
            print(f"  {spec.name} {tb.category}: not found: {tb.text!r}")
            continue
        g = norm(got[pairs[i]]["text"])
        if t != g:
            ops = difflib.SequenceMatcher(None, t, g, autojunk=False).get_opcodes()
            edits = [(op, t[a:b], g[c:d]) for op, a, b, c, d in ops if op != "equal"]
            print(f"  {spec.name} {tb.category} [{levenshtein(t, g)}/{len(t)}]: {edits}")


def quality(server, specs, images, results, show_errors: bool = False, old=None) -> None:
    # quality on scans
    acc = new_acc()
    for s in specs:
        body, _ = post(server, png(images[s.name]), s.name + ".png", format="json", language=LANG[s.language])
        score_page(s, body["blocks"], acc)
        if show_errors:
            print_errors(s, body["blocks"])
    results["scanned (PNG)"] = report(acc)
    # quality on text-layer PDFs (en, ru: the generator embeds DejaVu only)
    acc = new_acc()
    for s in (s for s in specs if s.language != "zh"):
        body, _ = post(server, draw_pdf([s]), s.name + ".pdf", format="json", model="doc_cpu")
        score_page(s, body["blocks"], acc)
    results["text layer (PDF)"] = report(acc)
    if old is not None:  # the same pages through the layout model (the fast path off)
        acc = new_acc()
        for s in (s for s in specs if s.language != "zh"):
            body, _ = post(old, draw_pdf([s]), s.name + ".pdf", format="json", model="doc_cpu")
            score_page(s, body["blocks"], acc)
        results["text layer (PDF), layout model"] = report(acc)
    print("QUALITY", json.dumps(results, ensure_ascii=False, indent=1))


def speed(server, specs, images, old=None) -> None:
    # speed: doc_cpu markdown against plain RapidOCR text on the same scanned pages, alternating
    scans = [png(images[s.name]) for s in specs if s.language != "ru"]
    t_doc = t_plain = 0.0
    for data in scans:
        _, dt = post(server, data, "p.png", format="markdown", model="doc_cpu")
        t_doc += dt
        _, dt = post(server, data, "p.png", model="rapidocr")
        t_plain += dt
    n = len(scans)
    print(f"SPEED scanned: doc_cpu markdown {n / t_doc:.2f} pages/s, rapidocr text {n / t_plain:.2f} pages/s, "
          f"ratio {t_plain / t_doc:.2f}")
    # text-layer pages
    digital = draw_pdf([s for s in specs if s.language != "zh"] * 5)
    body, dt = post(server, digital, "d.pdf")
    print(f"SPEED text layer, format=text: {body['pages'] / dt:.1f} pages/s ({body['pages']} pages in {dt:.2f} s)")
    body, dt = post(server, digital, "d.pdf", format="markdown", pages="1-10")
    print(f"SPEED text layer, doc_cpu markdown: {body['pages'] / dt:.2f} pages/s")
    if old is not None:  # alternating page by page: the fast path against the layout model
        t_new = t_old = 0.0
        pdfs = [draw_pdf([s]) for s in specs if s.language != "zh"]
        for data in pdfs:
            _, dt = post(server, data, "p.pdf", format="markdown", model="doc_cpu")
            t_new += dt
            _, dt = post(old, data, "p.pdf", format="markdown", model="doc_cpu")
            t_old += dt
        n = len(pdfs)
        print(f"SPEED text layer, doc_cpu markdown one page per request: fast path {n / t_new:.2f} pages/s, "
              f"layout model {n / t_old:.2f} pages/s, ratio {t_old / t_new:.1f}")


def jobs(server, specs, images, job_pages: int) -> None:

    # a long job: RSS stays flat (one page rendered at a time)
    long_pdf = draw_pdf([s for s in specs if s.language != "zh"] * (job_pages // 8 + 1))
    pages = f"1-{job_pages}"
    sampler = Sampler(server.proc.pid)
    start_rss = psutil.Process(server.proc.pid).memory_info().rss
    job = requests.post(f"{server.url}/jobs/ocr", files={"file": ("long.pdf", long_pdf)},
                        data={"pages": pages}, timeout=120).json()
    t = time.perf_counter()
    end = wait_job(server, job["job_id"])
    took = time.perf_counter() - t
    sampler.stop()
    q = len(sampler.rss) // 4 or 1
    print(f"JOB {end['pages_done']} pages ({end['status']}) in {took:.1f} s: RSS start {start_rss / 2**20:.0f} MB, "
          f"peak {sampler.peak / 2**20:.0f} MB, mean of first quarter {statistics.mean(sampler.rss[:q]) / 2**20:.0f} MB, "
          f"of last quarter {statistics.mean(sampler.rss[-q:]) / 2**20:.0f} MB")

    # four jobs at once use both cores
    sampler = Sampler(server.proc.pid)
    scan4 = scanned_pdf([images[s.name] for s in specs if s.language == "en"][:3])
    ids = [requests.post(f"{server.url}/jobs/ocr", files={"file": ("s.pdf", scan4)},
                         data={"format": "markdown", "model": "doc_cpu"}, timeout=60).json()["job_id"]
           for _ in range(4)]
    t = time.perf_counter()
    for i in ids:
        wait_job(server, i)
    took = time.perf_counter() - t
    sampler.stop()
    busy = [c for c in sampler.cpu if c > 0]
    print(f"JOBS x4 ({4 * 3} scanned pages) in {took:.1f} s: server CPU mean {statistics.mean(busy):.0f}% "
          f"(200% = both cores), p90 {sorted(busy)[int(len(busy) * 0.9)]:.0f}%")


if __name__ == "__main__":
    main()
