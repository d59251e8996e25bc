// The playground: a client of the public HTTP API, like any other. No framework, no build step.
"use strict";

const BASE = location.pathname.replace(/\/ui(\/.*)?$/, ""); // works behind a path prefix too
const KEY = "chatvlm.apiKey";
const $ = (id) => document.getElementById(id);
const el = (tag, attrs = {}, text) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
};

// ---------------------------------------------------------------- API calls and errors
class ApiError extends Error {
  constructor(status, message, code) { super(message); this.status = status; this.code = code; }
}

/** The server's message, whatever the surface's error shape: detail, error.message or error. */
function errorMessage(body, status) {
  if (body && typeof body === "object") {
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) return body.detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
    const e = body.error;
    if (e && typeof e === "object" && e.message) return String(e.message);
    if (typeof e === "string" && e) return e;
  }
  if (typeof body === "string" && body.trim()) return body.trim().slice(0, 500);
  return `HTTP ${status}: the server gave no message`;
}
const errorCode = (body) => (body && (body.code || (body.error && body.error.code))) || undefined;

const apiKey = () => sessionStorage.getItem(KEY) || "";
const authHeaders = () => (apiKey() ? { Authorization: `Bearer ${apiKey()}` } : {});

/** Every HTTP call goes through here: the key on every request, errors as the API's message. */
async function api(path, options = {}) {
  let res;
  try {
    res = await fetch(BASE + path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "cannot reach the server: " + err.message);
  }
  if (res.ok) return res;
  const text = await res.text();
  let body = text;
  try { body = JSON.parse(text); } catch (_) { /* not JSON: shown as text */ }
  const error = new ApiError(res.status, errorMessage(body, res.status), errorCode(body));
  if (res.status === 401) askForKey(apiKey() ? error.message : "");
  throw error;
}
const apiJson = async (path, options) => (await api(path, options)).json();

/** WebSockets cannot carry headers from a browser: the key goes in ?token= (the one place). */
function wsUrl(path) {
  const url = new URL(BASE + path, location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  if (apiKey()) url.searchParams.set("token", apiKey());
  return url.toString();
}
window.chatvlm = { api, apiJson, wsUrl };

function showError(id, err) {
  const box = $(id);
  if (!err) { box.hidden = true; box.textContent = ""; return; }
  if (err.name === "AbortError") return;
  box.textContent = err.code ? `${err.message} (${err.code})` : err.message || String(err);
  box.hidden = false;
}

// ---------------------------------------------------------------- auth
function askForKey(message) {
  const dialog = $("auth-dialog");
  $("auth-error").textContent = message || "";
  $("auth-error").hidden = !message;
  if (!dialog.open) dialog.showModal();
  $("auth-key").focus();
}
function updateKeyState() {
  $("key-state").textContent = apiKey() ? "key set for this tab" : "";
  $("forget-key").hidden = !apiKey();
}
$("auth-form").addEventListener("submit", () => {
  sessionStorage.setItem(KEY, $("auth-key").value.trim());
  $("auth-key").value = "";
  updateKeyState();
  refreshModels();
});
$("forget-key").addEventListener("click", () => { sessionStorage.removeItem(KEY); updateKeyState(); refreshModels(); });

// ---------------------------------------------------------------- tabs
function selectTab(name) {
  for (const b of document.querySelectorAll("header [data-tab]")) b.setAttribute("aria-selected", String(b.dataset.tab === name));
  for (const s of document.querySelectorAll("section.tab")) s.hidden = s.id !== `tab-${name}`;
  if (name === "models") refreshModels();
}
for (const b of document.querySelectorAll("header [data-tab]")) b.addEventListener("click", () => selectTab(b.dataset.tab));

// ---------------------------------------------------------------- models (shared by every tab)
let models = [];
async function refreshModels() {
  try {
    models = (await apiJson("/models")).available || [];
    showError("models-error", null);
  } catch (err) {
    showError("models-error", err);
    return;
  }
  fillSelect($("ocr-model"), models.filter((m) => m.tasks.includes("ocr")), "");
  fillSelect($("chat-model"), models.filter((m) => m.tasks.includes("chat") || m.tasks.includes("generate")), "default");
  renderModelsTable();
}
function fillSelect(select, list, defaultValue) {
  const keep = select.value;
  select.replaceChildren(el("option", { value: defaultValue }, "default"));
  for (const m of list) {
    const option = el("option", { value: m.id }, m.installed ? m.id : `${m.id} (not installed)`);
    if (!m.installed) option.disabled = true;
    select.append(option);
  }
  if ([...select.options].some((o) => o.value === keep && !o.disabled)) select.value = keep;
}
function renderModelsTable() {
  const body = $("models-table").tBodies[0];
  body.replaceChildren();
  for (const m of models) {
    const row = el("tr", { "data-model": m.id });
    for (const value of [m.id, m.name, m.kind, m.tasks.join(", "), m.installed ? "yes" : "no", m.loaded ? "yes" : "no", m.status])
      row.append(el("td", {}, value));
    row.append(el("td", { class: "reason" }, m.reason || ""));
    const actions = el("td");
    actions.append(...modelActions(m));
    row.append(actions);
    body.append(row);
  }
}
/** Buttons per model. The management service's start, stop and logs (with follow) belong here. */
function modelActions(m) {
  const load = el("button", { type: "button", "data-action": "load" }, "Load");
  load.disabled = !m.installed || m.loaded;
  load.onclick = () => modelCall(load, `/models/${encodeURIComponent(m.id)}/load`, "POST");
  const unload = el("button", { type: "button", "data-action": "unload" }, "Unload");
  unload.disabled = !m.loaded;
  unload.onclick = () => modelCall(unload, `/models/${encodeURIComponent(m.id)}`, "DELETE");
  return [load, unload];
}
async function modelCall(button, path, method) {
  button.disabled = true;
  button.textContent += "…";
  try {
    await api(path, { method });
    showError("models-error", null);
  } catch (err) {
    showError("models-error", err);
  }
  await refreshModels();
}
$("models-refresh").addEventListener("click", refreshModels);

// ---------------------------------------------------------------- OCR
const COLOURS = ["#2457d6", "#c2410c", "#15803d", "#9333ea", "#be123c", "#0e7490", "#a16207", "#4d7c0f", "#db2777", "#475569"];
const categoryColour = new Map();
const colourOf = (category) => {
  const key = category || "text";
  if (!categoryColour.has(key)) categoryColour.set(key, COLOURS[categoryColour.size % COLOURS.length]);
  return categoryColour.get(key);
};

const ocr = { file: null, kind: null, result: null, pages: [], page: 0, images: new Map() };

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
  Object.assign(ocr, { file, kind: await sniff(file), result: null, pages: [{ index: 0, size: null, blocks: [] }], page: 0, images: new Map() });
  $("drop").firstChild.textContent = `${file.name} (${Math.ceil(file.size / 1024)} KB) — drop another or `;
  $("ocr-run").disabled = false;
  showError("ocr-error", null);
  showResult(null);
  await showPage(0);
}

/** The page image at its original size: the file itself, or the server's rendering for PDF and TIFF. */
async function pageImage(index) {
  if (ocr.images.has(index)) return ocr.images.get(index);
  let blob = ocr.file;
  if (ocr.kind !== "image") {
    const form = new FormData();
    form.append("file", ocr.file, ocr.file.name);
    form.append("page", String(index));
    blob = await (await api("/pages/render", { method: "POST", body: form })).blob();
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

/** The one place an OCR request is made. Long PDFs go through the job API (POST /jobs/ocr, progress
 *  from /jobs/{id}/events, then /jobs/{id}/result) once the server has it; today: POST /ocr. */
async function runOcr(file, { model, language, format, pages }) {
  const form = new FormData();
  form.append("file", file, file.name);
  if (model) form.append("model", model);
  if (language) form.append("language", language);
  if (pages) form.append("pages", pages);
  form.append("format", format);
  return apiJson("/ocr", { method: "POST", body: form });
}

$("ocr-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (!ocr.file) return;
  const params = { model: $("ocr-model").value, language: $("ocr-language").value.trim(), format: $("ocr-format").value,
    pages: $("ocr-pages").value.trim() };
  $("ocr-run").disabled = true;
  $("ocr-status").textContent = "reading…";
  showError("ocr-error", null);
  try {
    const result = await runOcr(ocr.file, params);
    ocr.result = result;
    ocr.pages = result.page_results
      ? result.page_results.map((p) => ({ index: p.page, size: p.image_size, blocks: p.blocks }))
      : [{ index: 0, size: result.image_size, blocks: result.blocks }];
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

// ---------------------------------------------------------------- chat
const chat = { messages: [], controller: null, imageUrl: null };
const readDataUrl = (file) => new Promise((resolve, reject) => {
  const reader = new FileReader();
  reader.onload = () => resolve(reader.result);
  reader.onerror = () => reject(reader.error);
  reader.readAsDataURL(file);
});
$("chat-image").addEventListener("change", async (e) => {
  const file = e.target.files[0];
  chat.imageUrl = file ? await readDataUrl(file) : null;
  $("chat-preview").hidden = !file;
  if (file) $("chat-preview").src = chat.imageUrl;
});
for (const [input, out] of [["chat-temperature", "temp-out"], ["chat-top-p", "topp-out"]])
  $(input).addEventListener("input", () => { $(out).textContent = $(input).value; });

function chatParams() {
  return { model: $("chat-model").value || "default", temperature: Number($("chat-temperature").value),
    top_p: Number($("chat-top-p").value), max_tokens: Number($("chat-max-tokens").value) || 256 };
}
function userMessage(prompt, imageUrl) {
  return imageUrl ? { role: "user", content: [{ type: "text", text: prompt }, { type: "image_url", image_url: { url: imageUrl } }] }
    : { role: "user", content: prompt };
}
function addBubble(role, text, imageUrl) {
  const box = el("div", { class: `msg ${role}` });
  box.append(el("b", {}, role));
  if (imageUrl) box.append(el("img", { src: imageUrl, alt: "" }));
  const body = el("span", { class: "text" }, text);
  box.append(body);
  $("messages").append(box);
  $("messages").scrollTop = $("messages").scrollHeight;
  return body;
}

/** Stream an OpenAI chat completion; onText gets each piece. Aborting the signal closes the
 *  connection, and the server stops generating. */
async function streamChat(body, signal, onText) {
  const res = await api("/v1/chat/completions", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ ...body, stream: true }), signal });
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue; // keep-alive comment
      if (data === "[DONE]") return finish;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(res.status, errorMessage(chunk, res.status), errorCode(chunk));
      for (const choice of chunk.choices || []) {
        if (choice.delta && choice.delta.content) onText(choice.delta.content);
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
  }
  return finish;
}

$("chat-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const prompt = $("chat-prompt").value.trim();
  if (!prompt || chat.controller) return;
  const message = userMessage(prompt, chat.imageUrl);
  addBubble("user", prompt, chat.imageUrl);
  const answer = addBubble("assistant", "");
  answer.parentElement.dataset.state = "streaming";
  $("chat-prompt").value = "";
  $("chat-image").value = "";
  chat.imageUrl = null;
  $("chat-preview").hidden = true;
  chat.controller = new AbortController();
  $("chat-send").disabled = true;
  $("chat-stop").disabled = false;
  showError("chat-error", null);
  let text = "";
  try {
    const finish = await streamChat({ ...chatParams(), messages: [...chat.messages, message] }, chat.controller.signal,
      (piece) => { text += piece; answer.textContent = text; $("messages").scrollTop = $("messages").scrollHeight; });
    answer.parentElement.dataset.state = finish || "stop";
  } catch (err) {
    answer.parentElement.dataset.state = err.name === "AbortError" ? "stopped" : "error";
    if (err.name === "AbortError") answer.textContent = text + " [stopped]";
    showError("chat-error", err);
  } finally {
    chat.messages.push(message, { role: "assistant", content: text });
    chat.controller = null;
    $("chat-send").disabled = false;
    $("chat-stop").disabled = true;
  }
});
$("chat-stop").addEventListener("click", () => chat.controller && chat.controller.abort());
$("chat-clear").addEventListener("click", () => { chat.messages = []; $("messages").replaceChildren(); showError("chat-error", null); });

// "View code": the request the Send button would make, as curl and Python.
const IMAGE = "__IMAGE_DATA_URL__";
function codeSamples() {
  const prompt = $("chat-prompt").value.trim() || "Describe this image";
  const history = chat.messages.map((m) => (typeof m.content === "string" ? m
    : { ...m, content: m.content.map((p) => (p.type === "image_url" ? { type: "image_url", image_url: { url: IMAGE } } : p)) }));
  const body = { ...chatParams(), stream: true, messages: [...history, userMessage(prompt, chat.imageUrl ? IMAGE : null)] };
  const hasImage = JSON.stringify(body).includes(IMAGE);
  const origin = location.origin + BASE;
  const json = JSON.stringify(body, null, 2);
  const auth = apiKey() ? ` \\\n  -H "Authorization: Bearer $CHATVLM_API_KEY"` : "";
  const curl = (hasImage ? "IMAGE=$(base64 -w0 image.png)\n" : "") +
    `curl -N ${origin}/v1/chat/completions \\\n  -H 'Content-Type: application/json'${auth} \\\n  -d '` +
    json.replaceAll(IMAGE, `data:image/png;base64,'"$IMAGE"'`) + "'";
  const pyBody = JSON.stringify(body.messages, null, 4).replaceAll(`"${IMAGE}"`, 'f"data:image/png;base64,{image}"')
    .replace(/\btrue\b/g, "True").replace(/\bfalse\b/g, "False").replace(/\bnull\b/g, "None");
  const readImage = hasImage ? 'image = base64.b64encode(open("image.png", "rb").read()).decode()\n' : "";
  const python = `import base64, os\nfrom openai import OpenAI\n\n` +
    `client = OpenAI(base_url="${origin}/v1", api_key=os.environ.get("CHATVLM_API_KEY", "unused"))\n${readImage}` +
    `stream = client.chat.completions.create(\n    model=${JSON.stringify(body.model)}, temperature=${body.temperature}, ` +
    `top_p=${body.top_p}, max_tokens=${body.max_tokens}, stream=True,\n    messages=${pyBody})\n` +
    `for chunk in stream:\n    print(chunk.choices[0].delta.content or "", end="", flush=True)\n`;
  const requestsCode = `import base64, json, os\nimport requests\n\n${readImage}` +
    `headers = {"Authorization": "Bearer " + os.environ["CHATVLM_API_KEY"]} if "CHATVLM_API_KEY" in os.environ else {}\n` +
    `body = {"model": ${JSON.stringify(body.model)}, "temperature": ${body.temperature}, "top_p": ${body.top_p}, ` +
    `"max_tokens": ${body.max_tokens}, "stream": True,\n        "messages": ${pyBody}}\n` +
    `with requests.post("${origin}/v1/chat/completions", json=body, headers=headers, stream=True) as r:\n` +
    `    r.raise_for_status()\n    for line in r.iter_lines():\n` +
    `        if line.startswith(b"data: ") and line != b"data: [DONE]":\n` +
    `            for choice in json.loads(line[6:])["choices"]:\n` +
    `                print(choice["delta"].get("content") or "", end="", flush=True)\n`;
  return { curl, python, requests: requestsCode };
}
function showCode(kind) {
  for (const b of document.querySelectorAll("#code-tabs [data-code]")) b.setAttribute("aria-selected", String(b.dataset.code === kind));
  $("code-view").textContent = codeSamples()[kind];
}
for (const b of document.querySelectorAll("#code-tabs [data-code]")) b.addEventListener("click", () => showCode(b.dataset.code));
$("chat-code").addEventListener("click", () => { showCode("curl"); $("code-dialog").showModal(); });

// ---------------------------------------------------------------- start
updateKeyState();
refreshModels();
