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

// ---------------------------------------------------------------- start
updateKeyState();
refreshModels();
