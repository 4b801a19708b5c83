// The server's API as the page uses it: JSON requests, readable errors, streamed chat completions.
import { PlaygroundError } from "./ui.js";

export function unreachable() {
  return `Cannot reach the kvstash server at ${location.origin}: is \`kvstash serve\` still running? ` +
    "Start it again, then retry.";
}

// The server's API key (kvstash serve --api-key), kept in this browser; sent on every API call once given.
const KEY_ITEM = "kvstash.apiKey";

export function apiKey() {
  return localStorage.getItem(KEY_ITEM) || "";
}

export function setApiKey(key) {
  if (key) localStorage.setItem(KEY_ITEM, key);
  else localStorage.removeItem(KEY_ITEM);
}

function withKey(options) {
  const key = apiKey();
  if (!key) return options;
  return { ...options, headers: { ...(options.headers || {}), authorization: `Bearer ${key}` } };
}

// fetch with the API key, with a PlaygroundError saying so when the server cannot be reached or wants a (new)
// key (the key field is shown then); any other status is returned.
export async function request(path, options = {}) {
  let resp;
  try {
    resp = await fetch(path, withKey(options));
  } catch {
    throw new PlaygroundError(unreachable());
  }
  if (resp.status === 401) {
    const form = document.getElementById("key-form");
    form.hidden = false;
    document.getElementById("api-key").focus();
    throw new PlaygroundError(`${await errorText(resp)} Enter the server's API key at the top, then retry.`);
  }
  return resp;
}

// request, with a PlaygroundError carrying the server's message when it refuses.
export async function api(path, options = {}) {
  const resp = await request(path, options);
  if (!resp.ok) throw new PlaygroundError(await errorText(resp));
  return resp;
}

export async function errorText(resp) {
  try {
    const body = await resp.json();
    if (body.error && body.error.message) return `The server refused: ${body.error.message}`;
  } catch {
    // not JSON: say the status
  }
  return `The server answered HTTP ${resp.status}.`;
}

export function postJSON(path, body) {
  return api(path, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
}

// One streamed chat completion; onText(textSoFar) after each delta. Returns {text, ttftMs, ext, finish}: ttftMs
// from sending the request to the first text, ext the `kvstash` field of the chunk with the finish reason.
export async function streamChat(body, onText) {
  const t0 = performance.now();
  const resp = await postJSON("/v1/chat/completions", { ...body, stream: true });
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  const out = { text: "", ttftMs: null, ext: null, finish: null };
  let buffer = "";
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch {
      throw new PlaygroundError(`The answer broke off. ${unreachable()}`);
    }
    if (chunk.done) break;
    buffer += decoder.decode(chunk.value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (readEvent(event, out, t0)) onText(out.text);
    }
  }
  if (out.finish === null) throw new PlaygroundError(`The answer broke off before it finished. ${unreachable()}`);
  return out;
}

// Apply one server-sent event to `out`; true when text was added.
function readEvent(event, out, t0) {
  let grew = false;
  for (const line of event.split("\n")) {
    if (!line.startsWith("data:")) continue;
    const data = line.slice(5).trim();
    if (data === "[DONE]") continue;
    const msg = JSON.parse(data);
    if (msg.error) throw new PlaygroundError(`The server stopped the answer: ${msg.error.message}`);
    for (const choice of msg.choices || []) {
      const piece = choice.delta && choice.delta.content;
      if (piece) {
        if (out.ttftMs === null) out.ttftMs = performance.now() - t0;
        out.text += piece;
        grew = true;
      }
      if (choice.finish_reason) out.finish = choice.finish_reason;
    }
    if (msg.kvstash) out.ext = msg.kvstash;
  }
  return grew;
}
