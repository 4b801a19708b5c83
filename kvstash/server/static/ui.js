// Small DOM helpers and the status line. User text only ever goes into textContent, never into HTML.

export const $ = (id) => document.getElementById(id);

// An error meant for the user: its message says what happened and what to do.
export class PlaygroundError extends Error {}

export function say(text, kind = "info") {
  const status = $("status");
  status.textContent = text;
  status.className = `status ${kind}`;
}

export function fail(err) {
  if (!(err instanceof PlaygroundError)) console.warn(err); // a bug of ours: keep the details for a developer
  say(err instanceof PlaygroundError ? err.message : `Something went wrong: ${err.message || err}`, "error");
}

export function el(tag, className = "", text = null) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== null) node.textContent = String(text);
  return node;
}

export function button(label, title, onClick, disabled = false) {
  const b = el("button", "small", label);
  b.type = "button";
  b.title = title;
  b.setAttribute("aria-label", title);
  b.disabled = disabled;
  b.addEventListener("click", onClick);
  return b;
}

// [[term, value], ...] -> <dt>/<dd> pairs
export function pairs(items) {
  return items.flatMap(([k, v]) => [el("dt", "", k), el("dd", "", v === undefined || v === null ? "–" : v)]);
}

export function plural(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

export function ms(v) {
  return v === null || v === undefined ? "–" : `${Math.round(v)} ms`;
}
