// kvstash playground: ask over the ticked documents with any reuse method, or compare full prefill with blend
// side by side. Plain JavaScript modules over the server's own API, no framework, nothing fetched from elsewhere.
import { api, setApiKey, streamChat } from "./api.js";
import { checkDocuments, documentCount, documentNames, selectedIds, wireDocuments } from "./documents.js";
import { startMetrics } from "./metrics.js";
import { renderTokens, wireTokens } from "./tokens.js";
import { $, PlaygroundError, el, fail, ms, pairs, say } from "./ui.js";

const RATIO_METHODS = ["blend", "cacheblend"];
const ACTION_BUTTONS = ["ask", "compare", "add-doc"];
let busy = false;

// The request both buttons send, from the form; a PlaygroundError naming the field that is wrong.
function settings() {
  const question = $("question").value.trim();
  if (!question) throw new PlaygroundError("Type a question first.");
  const documents = selectedIds();
  if (!documents.length) {
    throw new PlaygroundError(documentCount()
      ? "No documents selected: tick at least one document in the list to ask over it."
      : "No documents yet: add one (paste text or drop a .txt / .md file), then ask.");
  }
  const maxTokens = Number($("max-tokens").value);
  if (!Number.isInteger(maxTokens) || maxTokens < 1) throw new PlaygroundError("Max tokens must be a whole number ≥ 1.");
  const temperature = Number($("temperature").value);
  if ($("temperature").value === "" || !(temperature >= 0 && temperature <= 2)) {
    throw new PlaygroundError("Temperature must be between 0 (greedy) and 2.");
  }
  const ratio = Number($("ratio").value);
  if ($("ratio").value === "" || !(ratio >= 0 && ratio <= 1)) throw new PlaygroundError("Ratio must be between 0 and 1.");
  const method = $("method").value;
  return {
    body: { messages: [{ role: "user", content: question }], documents, max_tokens: maxTokens, temperature },
    method: RATIO_METHODS.includes(method) ? `${method}:${ratio}` : method,
    blend: `${method === "cacheblend" ? "cacheblend" : "blend"}:${ratio}`, // what a comparison sets against full
  };
}

// Stream one answer into `target`; its numbers into `stats`.
async function answerInto(target, stats, body) {
  target.textContent = "";
  target.classList.add("streaming");
  stats.replaceChildren();
  try {
    const r = await streamChat(body, (text) => { target.textContent = text; });
    target.textContent = r.text || "(empty answer)";
    fillStats(stats, r);
    return r;
  } finally {
    target.classList.remove("streaming");
  }
}

async function ask() {
  const s = settings();
  showPanels("answer-panel");
  $("answer-method").textContent = `(${s.method})`;
  say(`Asking with ${s.method}…`);
  const r = await answerInto($("answer"), $("answer-stats"), { ...s.body, reuse: s.method, token_view: true });
  renderTokens(r.ext && r.ext.token_view, s.method, documentNames());
  say(`Answered with ${s.method}.`, "ok");
}

// The same question with full prefill and with blend, sent at once: the server batches them, both stream.
async function compare() {
  const s = settings();
  showPanels("compare-panel");
  $("cmp-summary").replaceChildren();
  $("cmp-blend").querySelector("h3").textContent = s.blend;
  say(`Comparing full prefill with ${s.blend}…`);
  const column = (id, reuse, view) => {
    const col = $(id);
    return answerInto(col.querySelector(".answer"), col.querySelector(".stats"), { ...s.body, reuse, token_view: view });
  };
  const [full, blend] = await Promise.all([column("cmp-full", "full", false), column("cmp-blend", s.blend, true)]);
  fillSummary(full, blend);
  renderTokens(blend.ext && blend.ext.token_view, s.blend, documentNames());
  say(`Compared full prefill with ${s.blend}.`, "ok");
}

function showPanels(id) {
  for (const panel of ["answer-panel", "compare-panel", "tokens-panel"]) $(panel).hidden = panel !== id;
}

function fillStats(dl, r) {
  const x = r.ext || {};
  const tiers = Object.entries(x.tier_hits || {}).map(([t, n]) => `${t} ${n}`).join(", ") || "none";
  dl.replaceChildren(...pairs([
    ["TTFT (browser)", ms(r.ttftMs)],
    ["TTFT (server)", x.ttft_s === undefined ? "–" : ms(x.ttft_s * 1000)],
    ["prompt tokens", x.prompt_tokens],
    ["reused tokens", x.reused_tokens],
    ["recomputed tokens", x.recomputed_tokens],
    ["tiers hit", tiers],
    ["tokens out", `${x.completion_tokens} (${r.finish})`],
  ]));
}

function fillSummary(full, blend) {
  const speedup = (a, b) => (a && b ? `${(a / b).toFixed(2)}×` : "–");
  const fx = full.ext || {};
  const bx = blend.ext || {};
  const agree = normalize(full.text) === normalize(blend.text);
  const share = bx.prompt_tokens ? ((100 * bx.recomputed_tokens) / bx.prompt_tokens).toFixed(0) : "–";
  $("cmp-summary").replaceChildren(
    el("span", "speedup", `TTFT speedup ${speedup(fx.ttft_s, bx.ttft_s)} (server), ` +
      `${speedup(full.ttftMs, blend.ttftMs)} (browser)`),
    el("span", agree ? "agree yes" : "agree no", agree ? "answers agree" : "answers differ"),
    el("span", "", `blend computed ${bx.recomputed_tokens} of ${bx.prompt_tokens} prompt tokens (${share}%)`),
  );
}

// Answers compared as text: case, runs of spaces and the final punctuation do not count.
function normalize(text) {
  return text.toLowerCase().replace(/\s+/g, " ").trim().replace(/[.!?]+$/, "");
}

// Run one user action at a time: the buttons are disabled meanwhile, errors go to the status line.
async function run(action) {
  if (busy) return say("Still working on the last request…");
  busy = true;
  for (const id of ACTION_BUTTONS) $(id).disabled = true;
  try {
    await action();
  } catch (err) {
    fail(err);
  } finally {
    busy = false;
    for (const id of ACTION_BUTTONS) $(id).disabled = false;
  }
}

async function start() {
  wireDocuments(run);
  wireTokens();
  $("ask").addEventListener("click", () => run(ask));
  $("compare").addEventListener("click", () => run(compare));
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter") run(ask);
  });
  const ratioApplies = () => { $("ratio").disabled = !RATIO_METHODS.includes($("method").value); };
  $("method").addEventListener("change", ratioApplies);
  ratioApplies();
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    setApiKey($("api-key").value.trim());
    $("api-key").value = "";
    $("key-form").hidden = true;
    run(async () => {
      await connect();
      say("API key accepted.", "ok");
    });
  });
  await run(connect);
  startMetrics();
}

// The served model's name, and the documents the server still knows; the first call that needs the API key.
async function connect() {
  const models = await (await api("/v1/models")).json();
  $("model").textContent = `model ${models.data.map((m) => m.id).join(", ")}`;
  await checkDocuments();
}

window.addEventListener("unhandledrejection", (e) => {
  e.preventDefault();
  fail(e.reason);
});
start();
