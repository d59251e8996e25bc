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

const TOKEN = "chatvlm.managementToken";
const apiKey = () => sessionStorage.getItem(KEY) || "";
const managementToken = () => sessionStorage.getItem(TOKEN) || "";
/** The management routes (/api/...) take a login token first, or an API key (as admin); the others
 *  an API key first (a login token stands for one when keys are on). */
const isManagement = (path) => path.startsWith("/api/");
const authHeaders = (path) => {
  const token = isManagement(path) ? managementToken() || apiKey() : apiKey() || managementToken();
  return token ? { Authorization: `Bearer ${token}` } : {};
};

/** Every HTTP call goes through here: the key on every request, errors as the API's message. */
async function api(path, options = {}) {
  let res;
  try {
    res = await fetch(BASE + path, { ...options, headers: { ...authHeaders(path), ...(options.headers || {}) } });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "cannot reach the server: " + err.message);
  }
  if (res.ok) return res;
  const text = await res.text();
  let body = text;
  try { body = JSON.parse(text); } catch (_) { /* not JSON: shown as text */ }
  const error = new ApiError(res.status, errorMessage(body, res.status), errorCode(body));
  if (res.status === 401 && !isManagement(path)) askForKey(apiKey() ? error.message : "");
  throw error;
}
const apiJson = async (path, options) => (await api(path, options)).json();

/** A management call: on 401 the sign-in dialog asks for a user and password (POST /api/auth/token),
 *  then the call is made again once with the new token. */
async function managementApi(path, options = {}) {
  try {
    return await api(path, options);
  } catch (err) {
    if (err.status !== 401) throw err;
    if (managementToken()) sessionStorage.removeItem(TOKEN); // expired or revoked
    await signIn(err.message);
    return api(path, options);
  }
}

/** Server-sent events of a streamed response, as {event, data} (a fetch: it carries the Authorization
 *  header, which EventSource cannot). Ends when the stream ends or the signal aborts. */
async function* sseEvents(res) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { event, data: data.join("\n") };
    }
  }
}

/** WebSockets cannot carry headers from a browser: the key goes in ?token= (the one place). */
function wsUrl(path) {
  const url = new URL(BASE + path, location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  if (apiKey()) url.searchParams.set("token", apiKey());
  return url.toString();
}
window.chatvlm = { api, apiJson, managementApi, sseEvents, wsUrl };

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
  $("key-state").textContent = [apiKey() ? "key set for this tab" : "", managementToken() ? "signed in" : ""]
    .filter(Boolean).join(", ");
  $("forget-key").hidden = !apiKey() && !managementToken();
}
$("auth-form").addEventListener("submit", () => {
  sessionStorage.setItem(KEY, $("auth-key").value.trim());
  $("auth-key").value = "";
  updateKeyState();
  refreshModels();
});
$("forget-key").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  sessionStorage.removeItem(TOKEN);
  updateKeyState();
  refreshModels();
});

// Sign-in for the management routes: one pending dialog, shared by every call waiting for it.
let signingIn = null;
function signIn(message) {
  const dialog = $("login-dialog");
  $("login-error").textContent = message || "";
  $("login-error").hidden = !message;
  if (!dialog.open) dialog.showModal();
  $("login-user").focus();
  if (!signingIn) {
    signingIn = new Promise((resolve, reject) => {
      const submit = async (event) => {
        event.preventDefault();
        try {
          const body = JSON.stringify({ username: $("login-user").value.trim(), password: $("login-password").value });
          const answer = await apiJson("/api/auth/token", { method: "POST", headers: { "Content-Type": "application/json" }, body });
          sessionStorage.setItem(TOKEN, answer.access_token);
          $("login-password").value = "";
          cleanup();
          dialog.close();
          updateKeyState();
          resolve();
        } catch (err) {
          $("login-error").textContent = err.message;
          $("login-error").hidden = false;
        }
      };
      const cancel = () => { cleanup(); reject(new ApiError(401, "sign-in cancelled", "AUTHENTICATION_FAILED")); };
      const cleanup = () => {
        $("login-form").removeEventListener("submit", submit);
        $("login-cancel").removeEventListener("click", cancelClick);
        dialog.removeEventListener("cancel", cancel);
        signingIn = null;
      };
      const cancelClick = () => { dialog.close(); cancel(); };
      $("login-form").addEventListener("submit", submit);
      $("login-cancel").addEventListener("click", cancelClick);
      dialog.addEventListener("cancel", cancel);
    });
  }
  return signingIn;
}

