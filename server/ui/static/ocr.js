// ocr.js: the OCR tab (page images, boxes by category, results, downloads).
"use strict";

// ---------------------------------------------------------------- OCR
const COLOURS = ["#2457d6", "#c2410c", "#15803d", "#9333ea", "#be123c", "#0e7490", "#a16207", "#4d7c0f", "#db2777", "#475569"];
const categoryColour = new Map();
const colourOf = (category) => {
  const key = category || "text";
  if (!categoryColour.has(key)) categoryColour.set(key, COLOURS[categoryColour.size % COLOURS.length]);
  return categoryColour.get(key);
};

const ocr = { file: null, kind: null, result: null, pages: [], page: 0, images: new Map(), pageCount: 1, job: null };
// PDFs of this many pages or more (of those selected) are read as a job: progress, and Cancel.
const JOB_PAGES = 4;

/** The file's kind from its first bytes (as the server decides), not from its name. */
async function sniff(file) {
  const b = new Uint8Array(await file.slice(0, 8).arrayBuffer());
  const ascii = String.fromCharCode(...b);
  if (ascii.startsWith("%PDF-")) return "pdf";
  if (ascii.startsWith("II*\0") || ascii.startsWith("MM\0*")) return "tiff";
  return "image"; // JPEG, PNG, BMP: the browser shows them itself (and the server says if it cannot)
}

async function chooseFile(file) {
  if (!file) return;
  for (const url of ocr.images.values()) URL.revokeObjectURL(url);
  Object.assign(ocr, { file, kind: await sniff(file), result: null, pages: [{ index: 0, size: null, blocks: [] }], page: 0,
    images: new Map(), pageCount: 1 });
  $("drop").firstChild.textContent = `${file.name} (${Math.ceil(file.size / 1024)} KB) — drop another or `;
  $("ocr-run").disabled = true;
  showError("ocr-error", null);
  showResult(null);
  await showPage(0); // a PDF's first rendering also tells its page count (a long one is read as a job)
  $("ocr-run").disabled = false;
}

/** The page image at its original size: the file itself, or the server's rendering for PDF and TIFF. */
async function pageImage(index) {
  if (ocr.images.has(index)) return ocr.images.get(index);
  let blob = ocr.file;
  if (ocr.kind !== "image") {
    const form = new FormData();
    form.append("file", ocr.file, ocr.file.name);
    form.append("page", String(index));
    const res = await api("/pages/render", { method: "POST", body: form });
    if (res.headers.get("X-Page-Count")) ocr.pageCount = Number(res.headers.get("X-Page-Count"));
    blob = await res.blob();
  }
  const url = URL.createObjectURL(blob);
  ocr.images.set(index, url);
  return url;
}

async function showPage(i) {
  ocr.page = i;
  const page = ocr.pages[i];
  $("pager").hidden = ocr.pages.length < 2;
  $("page-label").textContent = `page ${i + 1} of ${ocr.pages.length}`;
  $("page-prev").disabled = i === 0;
  $("page-next").disabled = i >= ocr.pages.length - 1;
  drawBoxes(page);
  try {
    const img = $("page-img");
    const url = await pageImage(page.index);
    if (ocr.page !== i) return; // another page was asked for meanwhile
    await new Promise((resolve) => { img.onload = img.onerror = resolve; img.src = url; });
    if (!page.size) drawBoxes({ ...page, size: [img.naturalWidth, img.naturalHeight] });
  } catch (err) {
    showError("ocr-error", err);
  }
}
$("page-prev").addEventListener("click", () => showPage(ocr.page - 1));
$("page-next").addEventListener("click", () => showPage(ocr.page + 1));

function drawBoxes(page) {
  const svg = $("boxes");
  svg.replaceChildren();
  if (!page.size) return;
  svg.setAttribute("viewBox", `0 0 ${page.size[0]} ${page.size[1]}`);
  svg.setAttribute("preserveAspectRatio", "none"); // boxes are in the page's pixels, the image fills the stage
  const used = new Set();
  for (const block of page.blocks) {
    if (!block.box) continue;
    const [x1, y1, x2, y2] = block.box;
    const colour = colourOf(block.category);
    used.add(block.category || "text");
    const rect = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    Object.entries({ x: x1, y: y1, width: Math.max(1, x2 - x1), height: Math.max(1, y2 - y1), stroke: colour, fill: colour,
      class: "block", "data-category": block.category || "text" }).forEach(([k, v]) => rect.setAttribute(k, v));
    const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
    title.textContent = block.text;
    rect.append(title);
    rect.addEventListener("mouseenter", () => {
      $("hover-text").textContent = `${block.category || "text"} · ${block.text}` +
        (block.confidence != null ? ` (confidence ${block.confidence.toFixed(2)})` : "");
    });
    svg.append(rect);
  }
  $("legend").replaceChildren(...[...used].map((c) => {
    const item = el("span", {}, c);
    const swatch = el("i");
    swatch.style.borderColor = colourOf(c === "text" ? null : c);
    item.prepend(swatch);
    return item;
  }));
}

/** The number of pages a selection ("1-3,7") picks from a document of n pages. */
function selectedPages(spec, n) {
  if (!spec) return n;
  const picked = new Set();
  for (const part of spec.split(",")) {
    const [a, b] = part.split("-").map((x) => parseInt(x, 10));
    for (let p = a; p <= (Number.isNaN(b) || b === undefined ? a : b) && p <= n; p++) if (p >= 1) picked.add(p);
  }
  return picked.size;
}

/** The one place an OCR request is made: POST /ocr, or for a long PDF a job (POST /jobs/ocr), followed
 *  page by page on /jobs/{id}/events, then its /jobs/{id}/result (the same body as /ocr). */
async function runOcr(file, { model, language, format, pages }) {
  const form = new FormData();
  form.append("file", file, file.name);
  if (model) form.append("model", model);
  if (language) form.append("language", language);
  if (pages) form.append("pages", pages);
  form.append("format", format);
  if (ocr.kind !== "pdf" || selectedPages(pages, ocr.pageCount) < JOB_PAGES) return apiJson("/ocr", { method: "POST", body: form });
  return runJob(form);
}

async function runJob(form) {
  const accepted = await apiJson("/jobs/ocr", { method: "POST", body: form });
  const job = ocr.job = { id: accepted.job_id, controller: new AbortController(), done: 0, total: 0 };
  showProgress(job, accepted.position ? `queued behind ${accepted.position} job(s)` : "starting");
  try {
    let final = null;
    const res = await api(`/jobs/${encodeURIComponent(job.id)}/events`, { signal: job.controller.signal });
    for await (const { event, data } of sseEvents(res)) {
      const body = JSON.parse(data);
      if (event === "status" || event === "end") {
        Object.assign(job, { done: body.pages_done ?? job.done, total: body.pages_total ?? job.total });
        showProgress(job, body.status);
        if (event === "end") { final = body; break; }
      } else if (event === "page") {
        job.done += 1;
        showProgress(job, "running");
      }
    }
    if (!final) throw new ApiError(0, "the job's progress stream ended early; its id is " + job.id);
    if (final.status === "cancelled") throw new ApiError(0, `job ${job.id} was cancelled after ${final.pages_done} of ${final.pages_total} page(s)`, "JOB_CANCELLED");
    if (final.status !== "succeeded") throw new ApiError(0, final.error || `job ${job.id} ${final.status}`, "JOB_FAILED");
    return await apiJson(`/jobs/${encodeURIComponent(job.id)}/result`);
  } finally {
    ocr.job = null;
    $("ocr-job").hidden = true;
  }
}

function showProgress(job, status) {
  $("ocr-job").hidden = false;
  $("ocr-progress").max = Math.max(1, job.total);
  $("ocr-progress").value = job.done;
  $("ocr-progress-label").textContent = `job ${job.id.slice(0, 8)}: ${status}, page ${job.done} of ${job.total || "?"}`;
  $("ocr-status").textContent = "reading as a job…";
}

$("ocr-cancel").addEventListener("click", async () => {
  const job = ocr.job;
  if (!job) return;
  $("ocr-cancel").disabled = true;
  try {
    await api(`/jobs/${encodeURIComponent(job.id)}`, { method: "DELETE" }); // the events stream then ends
  } catch (err) {
    showError("ocr-error", err);
  } finally {
    $("ocr-cancel").disabled = false;
  }
});

$("ocr-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (!ocr.file) return;
  const params = { model: $("ocr-model").value, language: $("ocr-language").value.trim(), format: $("ocr-format").value,
    pages: ocr.kind === "pdf" ? $("ocr-pages").value.trim() : "" }; // pages pick PDF pages
  $("ocr-run").disabled = true;
  $("ocr-status").textContent = "reading…";
  showError("ocr-error", null);
  try {
    const result = await runOcr(ocr.file, params);
    ocr.result = result;
    ocr.pages = result.page_results
      ? result.page_results.map((p) => ({ index: p.page, size: p.image_size, blocks: p.blocks }))
      : [{ index: firstPage(params.pages), size: result.image_size, blocks: result.blocks }];
    $("ocr-status").textContent = `${result.pages} page(s), ${result.blocks.length} block(s), read by ${result.model} in ${result.processing_time} s`;
    showResult(result);
    await showPage(0);
  } catch (err) {
    $("ocr-status").textContent = "";
    showError("ocr-error", err);
  } finally {
    $("ocr-run").disabled = false;
  }
});

/** The 0-based page a one-page answer is about: the lowest page of the selection ("3-4,2" -> 1). */
function firstPage(spec) {
  const numbers = (spec || "").split(/[,-]/).map((n) => parseInt(n, 10)).filter((n) => n >= 1);
  return numbers.length ? Math.min(...numbers) - 1 : 0;
}

const markdownOf = (result) => (result.markdown != null ? result.markdown : result.text);
function showResult(result) {
  $("view-text").textContent = result ? result.text : "";
  $("view-raw").textContent = result ? markdownOf(result) : "";
  $("view-rendered").innerHTML = result ? Markdown.render(markdownOf(result)) : ""; // escaped by the renderer
  $("view-json").textContent = result ? JSON.stringify(result, null, 2) : "";
  $("dl-md").disabled = $("dl-json").disabled = !result;
}
for (const b of document.querySelectorAll("#result-tabs [data-view]")) {
  b.addEventListener("click", () => {
    for (const o of document.querySelectorAll("#result-tabs [data-view]")) o.setAttribute("aria-selected", String(o === b));
    for (const v of ["text", "rendered", "raw", "json"]) $(`view-${v}`).hidden = v !== b.dataset.view;
  });
}
function download(name, text, type) {
  const a = el("a", { href: URL.createObjectURL(new Blob([text], { type })), download: name });
  document.body.append(a);
  a.click();
  setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
}
const stem = () => (ocr.file ? ocr.file.name.replace(/\.[^.]*$/, "") : "ocr");
$("dl-md").addEventListener("click", () => download(`${stem()}.md`, markdownOf(ocr.result), "text/markdown"));
$("dl-json").addEventListener("click", () => download(`${stem()}.json`, JSON.stringify(ocr.result, null, 2), "application/json"));

const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); chooseFile(e.dataTransfer.files[0]); });
$("ocr-file").addEventListener("change", (e) => chooseFile(e.target.files[0]));

