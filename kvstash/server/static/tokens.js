// The token view: the prompt's passages token by token, the tokens whose KV was computed for this question
// highlighted, and (after blend's probe) the question's attention on each token as a heat map.
import { $, el } from "./ui.js";

const KIND_LABEL = { system: "system prompt", user: "question" };

let shown = null; // {view, method, names} on screen, drawn again when the heat toggle changes

export function renderTokens(view, method, names) {
  if (!view) return;
  shown = { view, method, names };
  $("tokens-panel").hidden = false;
  $("tokens-method").textContent = `(${method})`;
  const hasFocus = view.some((seg) => seg.focus);
  $("focus-toggle").hidden = !hasFocus;
  const heat = hasFocus && $("show-focus").checked;
  // the chat template's glue is left out: a few fixed tokens, always computed
  const blocks = view.filter((seg) => seg.kind !== "glue").map((seg) => segmentBlock(seg, names, heat));
  $("tokens").replaceChildren(...blocks);
  $("tokens").classList.toggle("heat", heat);
}

function segmentBlock(seg, names, heat) {
  const block = el("div", `seg ${seg.kind}`);
  const title = seg.kind === "document"
    ? `${names.get(seg.document) || seg.document} (chunk ${seg.chunk + 1})`
    : KIND_LABEL[seg.kind] || seg.kind;
  const where = seg.reused ? `reused from ${seg.tier}` : "computed";
  const count = `${seg.recomputed.length} of ${seg.tokens.length} tokens computed`;
  block.append(el("div", "seg-head", `${title} · ${where} · ${count}`));
  const body = el("div", "seg-body");
  const recomputed = new Set(seg.recomputed);
  seg.tokens.forEach((piece, i) => {
    const span = el("span", recomputed.has(i) ? "tok rc" : "tok", piece);
    if (heat && seg.focus) span.style.setProperty("--heat", Math.sqrt(seg.focus[i]).toFixed(3));
    body.append(span);
  });
  block.append(body);
  return block;
}

export function wireTokens() {
  $("show-focus").addEventListener("change", () => {
    if (shown) renderTokens(shown.view, shown.method, shown.names);
  });
}
