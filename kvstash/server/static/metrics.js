// The server panel: GET /metrics every few seconds, read from the Prometheus text.
import { $, ms, say } from "./ui.js";
import { unreachable } from "./api.js";

const EVERY_MS = 3000;
let down = false;

export function startMetrics() {
  poll();
  setInterval(poll, EVERY_MS);
}

async function poll() {
  let text;
  try {
    const resp = await fetch("/metrics");
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    text = await resp.text();
  } catch {
    $("metrics-state").textContent = "(unreachable)";
    if (!down) say(unreachable(), "error");
    down = true;
    return;
  }
  if (down) say("The server answers again.", "ok");
  down = false;
  $("metrics-state").textContent = "";
  show(parse(text));
}

// Prometheus text -> [{name, labels, value}]
export function parse(text) {
  const rows = [];
  for (const line of text.split("\n")) {
    const m = /^([a-z_]+)(?:\{(.*)\})?\s+(\S+)$/.exec(line);
    if (!m) continue;
    const labels = {};
    for (const [, k, v] of (m[2] || "").matchAll(/(\w+)="([^"]*)"/g)) labels[k] = v;
    rows.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return rows;
}

function show(rows) {
  const sum = (name, keep = () => true) =>
    rows.filter((r) => r.name === name && keep(r.labels)).reduce((a, r) => a + r.value, 0);
  $("m-requests").textContent = sum("kvstash_requests_total", (l) => l.route === "/v1/chat/completions");
  const count = sum("kvstash_ttft_seconds_count");
  $("m-ttft").textContent = count ? ms((1000 * sum("kvstash_ttft_seconds_sum")) / count) : "–";
  // a lookup tries the tiers in order: it is a hit in one of them, or a miss in the last
  const misses = rows.filter((r) => r.name === "kvstash_cache_misses_total");
  const hits = sum("kvstash_cache_hits_total");
  const lookups = hits + (misses.length ? misses[misses.length - 1].value : 0);
  $("m-hits").textContent = lookups ? `${((100 * hits) / lookups).toFixed(0)}% of ${lookups}` : "–";
  const prompt = sum("kvstash_tokens_total", (l) => l.kind === "prompt");
  const reused = sum("kvstash_tokens_total", (l) => l.kind === "reused");
  $("m-reused").textContent = prompt ? `${((100 * reused) / prompt).toFixed(0)}%` : "–";
}
