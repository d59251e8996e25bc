// chat.js: the Chat tab (streaming over /v1/chat/completions, Stop, parameters, view code).
"use strict";

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

