// nanoseek's chat page: plain JS against the server's own OpenAI API, nothing fetched from
// elsewhere. Each turn sends the whole conversation (the server keeps no session) to
// /v1/chat/completions with stream: true and reads the SSE body itself (fetch +
// ReadableStream: EventSource cannot POST). Model output only ever goes through
// textContent, never innerHTML. An attached image goes as OpenAI's image_url content part,
// a data: URL read from the file in this browser (FileReader); the server decides what it takes.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), modelInfo: $("model-info"), newChat: $("new-chat"), toggle: $("toggle-settings"),
  settings: $("settings"), system: $("system"), temperature: $("temperature"),
  temperatureValue: $("temperature-value"), maxTokens: $("max-tokens"), apiKey: $("api-key"),
  messages: $("messages"), empty: $("empty"), error: $("error"), form: $("composer"),
  input: $("input"), send: $("send"), stop: $("stop"), image: $("image"), attachment: $("attachment"),
  attachmentPreview: $("attachment-preview"), attachmentName: $("attachment-name"),
  attachmentRemove: $("attachment-remove"),
};
const KEY_STORE = "nanoseek.apiKey";
const state = { history: [], controller: null, image: null };  // image: {name, url} attached

// ------------------------------------------------------------------ requests
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = ui.apiKey.value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

/** The server's OpenAI-style `{"error": {"message"}}`, or whatever text came back. */
async function describeFailure(response) {
  const text = await response.text();
  let message = text || response.statusText;
  try {
    const body = JSON.parse(text);
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON: keep the text */ }
  return `Error ${response.status}: ${message}`;
}

function networkFailure(err) {
  return `Network error: could not reach the server (${err.message || err})`;
}

async function loadModels() {
  let response;
  try {
    response = await fetch("v1/models", { headers: headers() });
  } catch (err) {
    return showError(networkFailure(err));
  }
  if (!response.ok) {
    if (response.status === 401) openSettings(true);  // the key field is where the fix goes
    return showError(await describeFailure(response));
  }
  const previous = ui.model.value;
  const cards = (await response.json()).data || [];
  ui.model.replaceChildren(...cards.map((card) => {
    const option = new Option(card.id, card.id);
    option.dataset.context = card.max_model_len || "";
    return option;
  }));
  if (cards.some((c) => c.id === previous)) ui.model.value = previous;
  showModelInfo();
  clearError();
}

function showModelInfo() {
  const option = ui.model.selectedOptions[0];
  ui.modelInfo.textContent = option && option.dataset.context ? `context ${option.dataset.context} tokens` : "";
}

function requestBody(messages) {
  const body = {
    model: ui.model.value, messages, stream: true, stream_options: { include_usage: true },
    temperature: Number(ui.temperature.value),
  };
  const maxTokens = ui.maxTokens.value.trim();
  if (maxTokens) body.max_tokens = Number(maxTokens);
  return body;
}

// ------------------------------------------------------------------ SSE
/** Yields the `data:` payload of each server-sent event; ends at `[DONE]` or the body's end. */
async function* sseData(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
      const events = buffer.split(/\r?\n\r?\n/);
      buffer = done ? "" : events.pop();
      for (const event of events) {
        const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (data === "[DONE]") return;
        if (data) yield data;
      }
      if (done) return;
    }
  } finally {
    reader.releaseLock();
  }
}

/** Streams one answer into `bubble`; returns {content, finish, usage}; throws on an error event. */
async function readAnswer(response, bubble) {
  const answer = { content: "", finish: null, usage: null };
  for await (const data of sseData(response.body)) {
    const chunk = JSON.parse(data);
    if (chunk.error) throw new Error(`Error: ${chunk.error.message}`);
    if (chunk.usage) answer.usage = chunk.usage;
    const choice = (chunk.choices || [])[0];
    if (!choice) continue;
    if (choice.delta && choice.delta.content) {
      answer.content += choice.delta.content;
      bubble.text.textContent = answer.content;
      bubble.root.dataset.chunks = Number(bubble.root.dataset.chunks || 0) + 1;
      followBottom();
    }
    if (choice.finish_reason) answer.finish = choice.finish_reason;
  }
  return answer;
}

// ------------------------------------------------------------------ the page
function addMessage(role, text, image) {
  ui.empty.hidden = true;
  const root = document.createElement("div");
  root.className = `msg ${role}`;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = role === "user" ? "You" : ui.model.value || "assistant";
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  if (image) {
    const img = document.createElement("img");
    img.src = image.url;  // a data: URL read from the user's own file
    img.alt = image.name;
    body.append(img);
  }
  const meta = document.createElement("div");
  meta.className = "meta";
  root.append(who, body, meta);
  ui.messages.append(root);
  followBottom(true);
  return { root, text: body, meta };
}

function followBottom(force) {
  const m = ui.messages;
  if (force || m.scrollHeight - m.scrollTop - m.clientHeight < 80) m.scrollTop = m.scrollHeight;
}

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = false;
}

function clearError() {
  ui.error.hidden = true;
  ui.error.textContent = "";
}

function setBusy(busy) {
  ui.send.disabled = busy;
  ui.stop.disabled = !busy;
  document.body.dataset.busy = busy ? "1" : "";
}

function describeAnswer(answer) {
  const parts = [];
  if (answer.usage) parts.push(`${answer.usage.completion_tokens} tokens`);
  if (answer.finish === "length") parts.push("stopped at max tokens");
  else if (answer.finish && answer.finish !== "stop") parts.push(answer.finish);
  return parts.join(" · ");
}

// ------------------------------------------------------------------ one turn
/** A user turn: plain text, or OpenAI's content parts when an image goes with it. */
function userTurn(text, image) {
  if (!image) return { role: "user", content: text };
  const parts = text ? [{ type: "text", text }] : [];
  parts.push({ type: "image_url", image_url: { url: image.url } });
  return { role: "user", content: parts };
}

async function send(text, image) {
  clearError();
  const system = ui.system.value.trim();
  const turn = userTurn(text, image);
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...state.history, turn];
  const mine = addMessage("user", text, image);
  const bubble = addMessage("assistant", "");
  bubble.root.classList.add("streaming");
  state.controller = new AbortController();
  setBusy(true);
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody(messages)),
      signal: state.controller.signal,
    });
    if (!response.ok) throw new Error(await describeFailure(response));
    const answer = await readAnswer(response, bubble);
    state.history.push(turn, { role: "assistant", content: answer.content });
    bubble.meta.textContent = describeAnswer(answer);
  } catch (err) {
    if (err.name === "AbortError") {
      // keep what arrived: the next turn sends it as the assistant's (partial) answer
      state.history.push(turn, { role: "assistant", content: bubble.text.textContent });
      bubble.meta.textContent = "stopped";
    } else {
      failTurn(mine, bubble, text, err instanceof TypeError ? networkFailure(err) : err.message);
      if (image && !state.image) attach(image);  // back in place, with the text, to retry
    }
  } finally {
    bubble.root.classList.remove("streaming");
    state.controller = null;
    setBusy(false);
  }
}

/** A failed turn stays visible but leaves the history; its text goes back in the box to retry. */
function failTurn(mine, bubble, text, message) {
  mine.root.classList.add("failed");
  mine.meta.textContent = "not sent (not part of the conversation)";
  if (bubble.text.textContent) bubble.root.classList.add("failed");
  else bubble.root.remove();
  if (!ui.input.value) ui.input.value = text;
  showError(message);
}

// ------------------------------------------------------------------ attachments
function attach(image) {
  state.image = image;
  ui.attachmentPreview.src = image ? image.url : "";
  ui.attachmentPreview.alt = image ? image.name : "";
  ui.attachmentName.textContent = image ? image.name : "";
  ui.attachment.hidden = !image;
}

/** The chosen file as {name, url}: a data: URL, read in this browser. */
function readImage(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve({ name: file.name, url: reader.result });
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

ui.image.addEventListener("change", async () => {
  const file = ui.image.files[0];
  ui.image.value = "";  // choosing the same file again fires change again
  if (!file) return;
  try {
    attach(await readImage(file));
    clearError();
  } catch (err) {
    showError(`Could not read ${file.name}: ${err.message || err}`);
  }
});
ui.attachmentRemove.addEventListener("click", () => attach(null));

function newChat() {
  if (state.controller) state.controller.abort();
  state.history = [];
  ui.messages.replaceChildren(ui.empty);
  ui.empty.hidden = false;
  clearError();
  ui.input.focus();
}

// ------------------------------------------------------------------ wiring
ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.input.value.trim();
  const image = state.image;
  if ((!text && !image) || state.controller) return;
  ui.input.value = "";
  attach(null);
  send(text, image);
});
ui.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.form.requestSubmit();
  }
});
ui.stop.addEventListener("click", () => state.controller && state.controller.abort());
ui.newChat.addEventListener("click", newChat);
ui.model.addEventListener("change", showModelInfo);
ui.temperature.addEventListener("input", () => { ui.temperatureValue.textContent = ui.temperature.value; });
ui.apiKey.addEventListener("change", () => {
  localStorage.setItem(KEY_STORE, ui.apiKey.value.trim());
  loadModels();
});
ui.settings.addEventListener("submit", (event) => event.preventDefault());
ui.toggle.addEventListener("click", () => openSettings(!ui.settings.classList.contains("open")));

/** On narrow windows the settings fold away behind the Settings button. */
function openSettings(open) {
  ui.settings.classList.toggle("open", open);
  ui.toggle.setAttribute("aria-expanded", String(open));
}

ui.apiKey.value = localStorage.getItem(KEY_STORE) || "";
ui.temperatureValue.textContent = ui.temperature.value;
setBusy(false);
loadModels();
ui.input.focus();
