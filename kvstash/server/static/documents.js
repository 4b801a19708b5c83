// The documents panel: text pasted or files dropped become registered documents (POST /v1/documents). The
// server has no list of them; the page keeps its own, in prompt order, in localStorage.
import { errorText, postJSON, request } from "./api.js";
import { $, PlaygroundError, button, el, plural, say } from "./ui.js";

const STORE_KEY = "kvstash.playground.documents";

let docs = load(); // [{id, preview, chunks, tokens, selected}], in prompt order
let run = (action) => action(); // how a button runs its action (set by wireDocuments)

export const selectedIds = () => docs.filter((d) => d.selected).map((d) => d.id);
export const documentCount = () => docs.length;
export const documentNames = () => new Map(docs.map((d) => [d.id, d.preview]));

function load() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE_KEY) || "[]");
    return Array.isArray(saved) ? saved.filter((d) => d && typeof d.id === "string") : [];
  } catch {
    return [];
  }
}

function save() {
  localStorage.setItem(STORE_KEY, JSON.stringify(docs));
  render();
}

function preview(text, name) {
  const words = text.trim().split(/\s+/);
  return (name ? `${name}: ` : "") + words.slice(0, 12).join(" ") + (words.length > 12 ? " …" : "");
}

export async function addDocument(text, name = "") {
  if (!text.trim()) {
    throw new PlaygroundError(
      name ? `${name} is empty: nothing to add.` : "The document is empty: paste some text or drop a .txt or .md file.",
    );
  }
  say(`Adding ${name || "the document"}: computing its KV…`);
  const info = await (await postJSON("/v1/documents", { text })).json();
  const entry = { id: info.id, preview: preview(text, name), chunks: info.chunks, tokens: info.tokens, selected: true };
  const at = docs.findIndex((d) => d.id === info.id); // the id is a hash of the text: the same text twice is one
  if (at >= 0) docs[at] = entry;
  else docs.push(entry);
  save();
  say(`Added ${name || "the document"}: ${plural(info.chunks, "chunk")}, ${plural(info.tokens, "token")}.`, "ok");
}

export async function addFiles(files) {
  for (const file of files) {
    if (!/\.(txt|md)$/i.test(file.name)) {
      throw new PlaygroundError(`${file.name} is not a .txt or .md file; only plain text can be added.`);
    }
    await addDocument(await file.text(), file.name);
  }
}

async function remove(id) {
  const resp = await request(`/v1/documents/${encodeURIComponent(id)}`, { method: "DELETE" });
  if (!resp.ok && resp.status !== 404) throw new PlaygroundError(await errorText(resp));
  docs = docs.filter((d) => d.id !== id);
  save();
  say(resp.ok ? "Document deleted." : "The server had already forgotten that document; removed it from the list.", "ok");
}

function move(index, step) {
  const to = index + step;
  if (to < 0 || to >= docs.length) return;
  [docs[index], docs[to]] = [docs[to], docs[index]];
  save();
}

export function render() {
  $("doc-list").replaceChildren(...docs.map(item));
  $("doc-empty").hidden = docs.length > 0;
}

function item(doc, index) {
  const li = el("li", "doc");
  li.dataset.id = doc.id;
  const box = el("input");
  box.type = "checkbox";
  box.checked = doc.selected;
  box.setAttribute("aria-label", `use ${doc.preview}`);
  box.addEventListener("change", () => {
    doc.selected = box.checked;
    save();
  });
  const text = el("span", "doc-text", doc.preview);
  text.title = doc.id;
  const meta = el("span", "doc-meta", `${plural(doc.chunks, "chunk")} · ${plural(doc.tokens, "token")}`);
  const buttons = el("span", "doc-buttons");
  buttons.append(
    button("↑", "move up", () => move(index, -1), index === 0),
    button("↓", "move down", () => move(index, 1), index === docs.length - 1),
    button("✕", "delete", () => run(() => remove(doc.id))),
  );
  li.append(box, text, meta, buttons);
  return li;
}

// Drop the documents the server no longer knows (it restarted with an in-memory registry, say).
export async function checkDocuments() {
  const known = [];
  for (const doc of docs) {
    const resp = await request(`/v1/documents/${encodeURIComponent(doc.id)}`);
    if (resp.status !== 404) known.push(doc);
  }
  if (known.length < docs.length) {
    const gone = docs.length - known.length;
    docs = known;
    save();
    say(`${plural(gone, "document")} had been forgotten by the server (restarted?); add them again.`, "error");
  }
}

export function wireDocuments(runAction) {
  run = runAction;
  $("add-doc").addEventListener("click", () => run(async () => {
    await addDocument($("doc-text").value);
    $("doc-text").value = "";
  }));
  $("doc-files").addEventListener("change", (e) => run(async () => {
    await addFiles([...e.target.files]);
    e.target.value = "";
  }));
  const drop = $("doc-text");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("dragging");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("dragging");
    run(() => addFiles([...e.dataTransfer.files]));
  });
  render();
}
