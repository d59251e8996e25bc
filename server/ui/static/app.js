// app.js: tabs, the model list every tab uses, the Models tab, and start-up (loaded last).
"use strict";

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
/** Buttons per model: load and unload (/models), and the management service's start, stop and logs
 *  (/api/models/{id}/..., which need a sign-in or an API key). */
function modelActions(m) {
  const id = encodeURIComponent(m.id);
  const load = el("button", { type: "button", "data-action": "load" }, "Load");
  load.disabled = !m.installed || m.loaded;
  load.onclick = () => modelCall(load, `/models/${id}/load`, "POST");
  const unload = el("button", { type: "button", "data-action": "unload" }, "Unload");
  unload.disabled = !m.loaded;
  unload.onclick = () => modelCall(unload, `/models/${id}`, "DELETE");
  const start = el("button", { type: "button", "data-action": "start", title: "Load it and keep it running, also after a restart" }, "Start");
  start.disabled = !m.installed || m.loaded;
  start.onclick = () => lifecycle(start, m.id, "start");
  const stop = el("button", { type: "button", "data-action": "stop", title: "Stop it: requests for it get 503 until it is started" }, "Stop");
  stop.disabled = !m.installed;
  stop.onclick = () => lifecycle(stop, m.id, "stop");
  const logs = el("button", { type: "button", "data-action": "logs" }, "Logs");
  logs.onclick = () => showLogs(m.id);
  return [load, unload, start, stop, logs];
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

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
/** Start or stop: the server answers 202 with a task, followed here until it ends. */
async function lifecycle(button, modelId, action) {
  button.disabled = true;
  button.textContent += "…";
  try {
    const id = encodeURIComponent(modelId);
    const accepted = await (await managementApi(`/api/models/${id}/${action}`, { method: "POST" })).json();
    for (;;) {
      const task = await (await managementApi(`/api/tasks/${encodeURIComponent(accepted.task_id)}`)).json();
      if (task.status === "succeeded") break;
      if (task.status === "failed") throw new ApiError(0, task.error || `${action} failed`, task.error_code);
      await sleep(300);
    }
    showError("models-error", null);
  } catch (err) {
    showError("models-error", err);
  }
  await refreshModels();
}

// ---------------------------------------------------------------- a model's log (follows new lines)
let logStream = null;
async function showLogs(modelId) {
  closeLogs();
  const stream = logStream = { modelId, controller: new AbortController() };
  const follow = $("logs-follow").checked;
  $("logs").hidden = false;
  $("logs-title").textContent = `Log of ${modelId}`;
  $("logs-view").textContent = "";
  try {
    const res = await managementApi(`/api/models/${encodeURIComponent(modelId)}/logs?lines=200${follow ? "&follow=true" : ""}`,
      { signal: stream.controller.signal });
    if (!follow) {
      for (const line of (await res.json()).logs) appendLog(line);
      return;
    }
    for await (const { data } of sseEvents(res)) {
      if (logStream !== stream) return;
      appendLog(JSON.parse(data));
    }
  } catch (err) {
    if (err.name !== "AbortError") showError("models-error", err);
  }
}
function appendLog(line) {
  const view = $("logs-view");
  const atEnd = view.scrollTop + view.clientHeight >= view.scrollHeight - 4;
  view.append(el("div", { class: `log ${line.level.toLowerCase()}` }, `${line.timestamp}  ${line.level.padEnd(7)} ${line.message}`));
  if (atEnd) view.scrollTop = view.scrollHeight;
}
function closeLogs() {
  if (logStream) logStream.controller.abort();
  logStream = null;
  $("logs").hidden = true;
}
$("logs-close").addEventListener("click", closeLogs);
$("logs-follow").addEventListener("change", () => { if (logStream) showLogs(logStream.modelId); });
$("models-refresh").addEventListener("click", refreshModels);

// ---------------------------------------------------------------- start
updateKeyState();
refreshModels();
