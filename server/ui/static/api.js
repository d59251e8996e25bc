// The playground: a client of the public HTTP API, like any other. No framework, no build step.
// api.js: every HTTP call, the API's error messages, and the API key (loaded first).
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

