// The chat page: sends the whole conversation to /v1/chat/completions with stream: true and shows
// the reply as its server-sent events arrive. Plain browser JavaScript, no build step, no network
// beyond this server.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = [];        // the conversation so far: {role, content}, without the system prompt
let modelName = null;
let controller = null;     // aborts the reply being streamed (the Stop button)

// The Authorization header of every API request, when the server wants a key (minimind serve --api_key).
function authHeaders() {
  const key = $("api_key").value.trim();
  return key ? {Authorization: `Bearer ${key}`} : {};
}

async function loadModelName() {
  try {
    const response = await fetch("/v1/models", {headers: authHeaders()});
    if (response.status === 401) {
      $("model").textContent = "this server needs an API key (left)";
      return;
    }
    modelName = (await response.json()).data[0].id;
    $("model").textContent = modelName;
  } catch (error) {
    $("model").textContent = "no model (is the server running?)";
  }
}

function addMessage(role, text) {
  const element = document.createElement("div");
  element.className = `message ${role}`;
  element.textContent = text;
  $("messages").appendChild(element);
  element.scrollIntoView({block: "end"});
  return element;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("new_chat").disabled = busy;
}

function requestBody() {
  const system = $("system").value.trim();
  const messages = (system ? [{role: "system", content: system}] : []).concat(conversation);
  const body = {messages, stream: true, stream_options: {include_usage: true}};
  if (modelName) body.model = modelName;
  const temperature = parseFloat($("temperature").value);
  const maxTokens = parseInt($("max_tokens").value, 10);
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  if (!Number.isNaN(maxTokens)) body.max_tokens = maxTokens;
  return body;
}

// Server-sent events: blocks separated by a blank line; we read the `data:` lines of each.
async function* serverSentEvents(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  while (true) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart()).join("\n");
      if (data) yield data;
    }
  }
}

function describeSpeed(usage, started, firstToken, finishReason) {
  const seconds = (performance.now() - started) / 1000;
  const tokens = usage ? usage.completion_tokens : 0;
  const rate = seconds > 0 ? (tokens / seconds).toFixed(1) : "–";
  const first = firstToken ? `, first after ${((firstToken - started) / 1000).toFixed(2)} s` : "";
  return `${tokens} tokens in ${seconds.toFixed(2)} s: ${rate} tok/s${first} · finish: ${finishReason}`;
}

async function send() {
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  addMessage("user", text);
  conversation.push({role: "user", content: text});
  const bubble = addMessage("assistant", "");
  controller = new AbortController();
  setBusy(true);
  $("status").textContent = "generating…";
  const started = performance.now();
  let reply = "", firstToken = null, usage = null, finishReason = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: {"Content-Type": "application/json", ...authHeaders()},
      body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (!response.ok) {
      const error = await response.json().catch(() => ({error: {message: response.statusText}}));
      throw new Error(error.error ? error.error.message : response.statusText);
    }
    for await (const data of serverSentEvents(response.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) {
        firstToken = firstToken || performance.now();
        reply += choice.delta.content;
        bubble.textContent = reply;
        bubble.scrollIntoView({block: "end"});
      }
      finishReason = choice.finish_reason || finishReason;
    }
    conversation.push({role: "assistant", content: reply});
    $("status").textContent = describeSpeed(usage, started, firstToken, finishReason);
  } catch (error) {
    if (error.name === "AbortError") {
      // The reply so far stays in the conversation: it is what the user saw.
      conversation.push({role: "assistant", content: reply});
      $("status").textContent = `stopped after ${((performance.now() - started) / 1000).toFixed(2)} s`;
    } else {
      conversation.pop();  // the failed turn is not sent again
      bubble.remove();
      addMessage("error", `error: ${error.message}`);
      $("status").textContent = "";
    }
  } finally {
    controller = null;
    setBusy(false);
  }
}

$("composer").addEventListener("submit", (event) => { event.preventDefault(); send(); });
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); send(); }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("new_chat").addEventListener("click", () => {
  conversation.length = 0;
  $("messages").replaceChildren();
  $("status").textContent = "";
});
$("api_key").addEventListener("change", loadModelName);
loadModelName();
