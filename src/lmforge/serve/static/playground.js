// lmforge playground: one panel per thing the selected model can do. Plain DOM, no build step, no CDN.
"use strict";

const $ = (id) => document.getElementById(id);
const PANELS = ["completions", "fill-mask", "classify", "tag", "qa", "embeddings", "attention"];
let models = [];
let streaming = null; // AbortController of the running completion

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(text, isError) {
  const s = $("status");
  s.textContent = text;
  s.className = isError ? "error" : "muted";
}

async function post(path, body) {
  const res = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body) });
  const data = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error((data.error && data.error.message) || res.status + " " + res.statusText);
  return data;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "style") node.style.cssText = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : String(c));
  return node;
}

function bar(label, p) {
  return el("div", { class: "candidate" }, el("span", {}, label),
    el("div", { class: "bar", style: "width:" + (100 * p).toFixed(1) + "%" }), el("span", {}, p.toFixed(3)));
}

function heat(v) { // 0..1 -> a blue with that strength
  const a = Math.max(0, Math.min(1, v));
  return "background: rgba(40, 90, 200, " + a.toFixed(3) + "); color: " + (a > 0.55 ? "#fff" : "#000");
}

function current() { return models.find((m) => m.id === $("model").value); }

function showPanels() {
  const m = current();
  const caps = m ? m.capabilities || [] : [];
  for (const p of PANELS) $("panel-" + p).hidden = !caps.includes(p);
  $("model-info").textContent = m ? m.kind + (m.context ? ", context " + m.context : "") : "";
}

async function loadModels() {
  try {
    const res = await fetch("/v1/models", { headers: headers() });
    if (!res.ok) { setStatus("cannot list models: " + res.status + " (API key?)", true); return; }
    models = (await res.json()).data;
    const select = $("model");
    select.replaceChildren(...models.map((m) => el("option", { value: m.id }, m.id)));
    showPanels();
    setStatus(models.length + " model(s) loaded");
  } catch (e) { setStatus("cannot reach the server: " + e.message, true); }
}

// ---- completion (server-sent events) ----
async function generate() {
  const out = $("completion-output");
  out.textContent = "";
  out.classList.remove("error");
  const body = { model: $("model").value, prompt: $("prompt").value, stream: true,
    max_tokens: Number($("max-tokens").value), temperature: Number($("temperature").value),
    top_p: Number($("top-p").value) };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  streaming = new AbortController();
  $("generate").disabled = true; $("stop-generate").disabled = false;
  setStatus("generating…");
  try {
    const res = await fetch("/v1/completions", { method: "POST", headers: headers(), body: JSON.stringify(body),
      signal: streaming.signal });
    if (!res.ok) {
      const data = await res.json().catch(() => ({}));
      throw new Error((data.error && data.error.message) || String(res.status));
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", finish = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const c of chunk.choices) { out.textContent += c.text; if (c.finish_reason) finish = c.finish_reason; }
      }
    }
    setStatus("done (" + (finish || "?") + ")");
  } catch (e) {
    if (e.name === "AbortError") setStatus("stopped");
    else { out.classList.add("error"); setStatus(e.message, true); }
  } finally {
    streaming = null;
    $("generate").disabled = false; $("stop-generate").disabled = true;
  }
}

// ---- fill-mask ----
async function fill() {
  const out = $("mask-output");
  try {
    const data = await post("/v1/fill-mask", { model: $("model").value, inputs: [$("mask-text").value],
      top_k: Number($("mask-top-k").value) });
    const masks = data.data[0].masks;
    out.replaceChildren(...masks.map((cands, i) => el("div", { class: "mask" },
      el("strong", {}, masks.length > 1 ? "[MASK] " + (i + 1) : "[MASK]"),
      ...cands.map((c) => bar(c.token, c.score)))));
    setStatus("filled " + masks.length + " mask(s)");
  } catch (e) { out.textContent = ""; setStatus(e.message, true); }
}

// ---- classify ----
async function classify() {
  const out = $("classify-output");
  const input = { text: $("classify-text").value };
  if ($("classify-pair").value) input.text_pair = $("classify-pair").value;
  try {
    const data = await post("/v1/classify", { model: $("model").value, inputs: [input] });
    const p = data.data[0];
    const probs = Object.entries(p.probs).sort((a, b) => b[1] - a[1]);
    out.replaceChildren(el("p", {}, "label: ", el("strong", {}, p.label)), ...probs.map(([l, v]) => bar(l, v)));
    setStatus("classified");
  } catch (e) { out.textContent = ""; setStatus(e.message, true); }
}

// ---- spans highlighted in a text ----
const COLOURS = ["#ffe08a", "#b8e6b8", "#ffc4c4", "#c9d8ff", "#f0c8ff", "#c8f4f0"];
function highlight(text, spans) { // spans: [{start, end, label}] character offsets, non-overlapping
  const types = [...new Set(spans.map((s) => s.label))];
  const nodes = [];
  let at = 0;
  for (const s of [...spans].sort((a, b) => a.start - b.start)) {
    if (s.start < at) continue;
    nodes.push(text.slice(at, s.start));
    const colour = COLOURS[types.indexOf(s.label) % COLOURS.length];
    nodes.push(el("mark", { style: "background:" + colour, title: s.title || s.label },
      text.slice(s.start, s.end), el("sub", {}, s.label)));
    at = s.end;
  }
  nodes.push(text.slice(at));
  return el("p", { class: "highlighted" }, ...nodes);
}

async function tag() {
  const out = $("tag-output");
  const text = $("tag-text").value;
  try {
    const data = await post("/v1/tag", { model: $("model").value, inputs: [text] });
    const ents = data.data[0].entities || [];
    const spans = ents.map((e) => ({ start: e.start, end: e.end, label: e.type,
      title: e.type + (e.score != null ? " " + e.score.toFixed(3) : "") }));
    out.replaceChildren(highlight(text, spans), el("p", { class: "muted" }, ents.length + " entities"));
    setStatus("tagged");
  } catch (e) { out.textContent = ""; setStatus(e.message, true); }
}

async function qa() {
  const out = $("qa-output");
  const context = $("qa-context").value;
  try {
    const data = await post("/v1/qa", { model: $("model").value,
      inputs: [{ question: $("qa-question").value, context: context }] });
    const a = data.data[0];
    const score = a.score != null ? " (" + a.score.toFixed(3) + ")" : "";
    if (a.start != null && a.end != null) out.replaceChildren(highlight(context, [{ start: a.start, end: a.end, label: "answer" + score }]));
    else out.replaceChildren(el("p", {}, "answer: ", el("strong", {}, a.answer || a.text || ""), score));
    setStatus("answered");
  } catch (e) { out.textContent = ""; setStatus(e.message, true); }
}

// ---- matrices: embedding similarity, attention ----
function matrixTable(rows, cols, value, show) {
  const table = el("table", { class: "matrix" });
  table.append(el("tr", {}, el("th", {}), ...cols.map((c) => el("th", { class: "col", title: c }, c))));
  rows.forEach((r, i) => table.append(el("tr", {}, el("th", { title: r }, r),
    ...cols.map((_, j) => el("td", { style: heat(value(i, j)) }, show(i, j))))));
  return table;
}

async function embed() {
  const out = $("embed-output");
  const sentences = $("embed-text").value.split("\n").map((s) => s.trim()).filter((s) => s);
  try {
    const data = await post("/v1/embeddings", { model: $("model").value, input: sentences });
    const v = data.data.map((d) => d.embedding);
    const dot = (a, b) => a.reduce((s, x, k) => s + x * b[k], 0);
    const norm = v.map((a) => Math.sqrt(dot(a, a)));
    const sim = v.map((a, i) => v.map((b, j) => dot(a, b) / (norm[i] * norm[j])));
    out.replaceChildren(matrixTable(sentences, sentences, (i, j) => sim[i][j], (i, j) => sim[i][j].toFixed(2)));
    const cut = data.usage.truncated_tokens;
    setStatus("cosine similarity of " + sentences.length + " sentences" + (cut ? " (" + cut + " tokens truncated)" : ""));
  } catch (e) { out.textContent = ""; setStatus(e.message, true); }
}

async function attention() {
  const out = $("attention-output");
  const head = $("attention-head").value.trim();
  const body = { model: $("model").value, text: $("attention-text").value, layer: Number($("attention-layer").value) };
  if (head !== "" && head !== "all") body.head = Number(head);
  try {
    const data = await post("/v1/attention", body);
    const m = data.matrix;
    const top = Math.max(...m.flat()) || 1;
    out.replaceChildren(el("p", { class: "muted" }, data.title + " (row: attending token, column: attended)"),
      matrixTable(data.tokens, data.tokens, (i, j) => m[i][j] / top, (i, j) => m[i][j].toFixed(2)));
    setStatus("attention of " + data.tokens.length + " tokens");
  } catch (e) { out.textContent = ""; setStatus(e.message, true); }
}

$("model").addEventListener("change", showPanels);
$("api-key").addEventListener("change", loadModels);
$("generate").addEventListener("click", generate);
$("stop-generate").addEventListener("click", () => streaming && streaming.abort());
$("fill").addEventListener("click", fill);
$("classify").addEventListener("click", classify);
$("tag").addEventListener("click", tag);
$("qa").addEventListener("click", qa);
$("embed").addEventListener("click", embed);
$("attention").addEventListener("click", attention);
loadModels();
