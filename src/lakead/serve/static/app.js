// The lakead page: plain JavaScript over the service's JSON API (no build step).
"use strict";

const $ = (sel) => document.querySelector(sel);
const IMAGE_ENDINGS = [".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"];
const TOKEN_KEY = "lakead-token";

const state = { info: null, models: [], fitFiles: [], authRequired: false, batches: 0 };

// ---- token: from the page address (#token=...), kept for this tab only -------------------

function takeTokenFromAddress() {
  const m = /(?:^#|&)token=([^&]*)/.exec(location.hash);
  if (m) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);  // keep it out of the address bar
  }
}
const token = () => sessionStorage.getItem(TOKEN_KEY) || "";

// ---- API ---------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, detail, errors) {
    super(detail);
    this.status = status;
    this.errors = errors || [];
  }
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  // sent as UTF-8 bytes (a header value is bytes; the server compares them with the token's UTF-8)
  if (token()) headers.set("Authorization", "Bearer " + unescape(encodeURIComponent(token())));
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (e) {
    throw new ApiError(0, "the service cannot be reached (" + e.message + ")");
  }
  if (response.status === 204) return null;
  let body = null;
  try { body = await response.json(); } catch (e) { /* not JSON */ }
  if (!response.ok) {
    if (response.status === 401) askForToken();
    const detail = body && typeof body.detail === "string" ? body.detail : `${response.status} ${response.statusText}`;
    throw new ApiError(response.status, detail, body && body.errors);
  }
  return body;
}

// ---- messages ----------------------------------------------------------------------------

function showMessage(text, kind = "error") {
  const el = $("#message");
  el.textContent = text;
  el.className = kind === "info" ? "info" : "";
  el.hidden = !text;
}

function errorText(err) {
  let text = err.message;
  if (err.errors && err.errors.length > 1) {
    text += "\n" + err.errors.map((e) => `• ${e.name}: ${e.problem}`).join("\n");
  }
  return text;
}

function askForToken() {
  $("#token-form").hidden = false;
  $("#token").focus();
}

// ---- files -------------------------------------------------------------------------------

function isImage(file) {
  const name = file.name.toLowerCase();
  return (file.type && file.type.startsWith("image/")) || IMAGE_ENDINGS.some((e) => name.endsWith(e));
}

// Files of a drop, folders searched recursively (hidden files skipped), sorted by path.
async function droppedFiles(dataTransfer) {
  const entries = [];
  for (const item of dataTransfer.items || []) {
    const entry = item.webkitGetAsEntry ? item.webkitGetAsEntry() : null;
    if (entry) entries.push(entry);
  }
  if (!entries.length) return Array.from(dataTransfer.files || []);
  const out = [];
  async function walk(entry, prefix) {
    if (entry.name.startsWith(".")) return;
    if (entry.isFile) {
      const file = await new Promise((ok, fail) => entry.file(ok, fail));
      out.push({ path: prefix + file.name, file });
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) {  // readEntries returns the listing in pieces
        const batch = await new Promise((ok, fail) => reader.readEntries(ok, fail));
        if (!batch.length) break;
        for (const child of batch) await walk(child, prefix + entry.name + "/");
      }
    }
  }
  for (const entry of entries) await walk(entry, "");
  out.sort((a, b) => a.path.localeCompare(b.path));
  return out.map((x) => x.file);
}

function setupDrop(zone, input, onFiles) {
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", async (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    onFiles(await droppedFiles(e.dataTransfer));
  });
  input.addEventListener("change", () => { onFiles(Array.from(input.files)); input.value = ""; });
}

function splitImages(files) {
  const images = files.filter(isImage);
  const ignored = files.length - images.length;
  return { images, ignored };
}

const mib = (bytes) => (bytes < 2 ** 20 ? Math.ceil(bytes / 1024) + " KiB" : (bytes / 2 ** 20).toFixed(1) + " MiB");
const fmt = (x, digits = 4) => (x === null || x === undefined ? "none" : Number(x).toPrecision(digits));

// ---- models ------------------------------------------------------------------------------

async function loadModels(selectId) {
  const { models } = await api("/models");
  state.models = models;
  const select = $("#model-select");
  const keep = selectId || select.value;
  select.replaceChildren();
  if (!models.length) select.append(new Option("(none yet: create one below)", ""));
  for (const m of models) {
    select.append(new Option(`${m.class_name} · ${m.id} · ${m.support_images} images`, m.id));
  }
  if (models.some((m) => m.id === keep)) select.value = keep;
  showModel();
}

function currentModel() {
  return state.models.find((m) => m.id === $("#model-select").value) || null;
}

function showModel() {
  const m = currentModel();
  const dl = $("#model-info");
  dl.replaceChildren();
  $("#delete-model").disabled = !m;
  if (!m) return;
  const rows = [
    ["id", m.id], ["class", m.class_name], ["normal images", m.support_images],
    ["threshold", fmt(m.threshold)],
    ["decision rule", m.false_alarm_rate != null ? `${m.threshold_rule}, false-alarm budget ${m.false_alarm_rate}` : m.threshold_rule],
    ["method", m.method], ["backbone", m.backbone], ["fitted", m.fitted_at],
  ];
  // what the method says of itself (its summary): no method is shown with another's keys
  for (const [k, v] of Object.entries(m.description || {})) {
    if (v === null || typeof v === "object") continue;
    rows.push([k.replaceAll("_", " "), typeof v === "number" && !Number.isInteger(v) ? fmt(v) : v]);
  }
  for (const [k, v] of rows) {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = String(v);
    dl.append(dt, dd);
  }
  for (const w of m.warnings) {
    const dd = document.createElement("dd"); dd.className = "warn"; dd.textContent = "⚠ " + w;
    dl.append(dd);
  }
}

async function deleteModel() {
  const m = currentModel();
  if (!m || !confirm(`Delete model ${m.id} (${m.class_name})? This cannot be undone.`)) return;
  try {
    await api(`/models/${encodeURIComponent(m.id)}`, { method: "DELETE" });
    await loadModels();
    showMessage(`Deleted model ${m.id}.`, "info");
  } catch (err) {
    showMessage(errorText(err));
  }
}

// ---- creating a model --------------------------------------------------------------------

function buildOptionFields() {
  const box = $("#option-fields");
  box.replaceChildren();
  const info = state.info;
  if (info.backbones.length > 1) {
    const label = document.createElement("label");
    label.textContent = "backbone";
    const select = document.createElement("select");
    select.name = "backbone";
    for (const b of info.backbones) select.append(new Option(b, b));
    label.append(select);
    box.append(label);
  }
  // each method owns its options: the form shows the chosen method's only (GET /info options_by_method)
  const byMethod = info.options_by_method || {};
  if ((info.methods || []).length > 1) {
    const label = document.createElement("label");
    label.textContent = "method";
    const select = document.createElement("select");
    select.name = "method";
    select.id = "opt-method";
    for (const m of info.methods) select.append(new Option(m, m));
    select.value = info.methods.includes("lake") ? "lake" : info.methods[0];
    select.addEventListener("change", showMethodOptions);
    label.append(select);
    box.append(label);
  }
  const options = { ...info.fit_options };
  for (const [name, def] of Object.entries(info.method_options || {})) if (!(name in options)) options[name] = def;
  for (const [name, def] of Object.entries(options)) {
    const label = document.createElement("label");
    label.textContent = name;
    label.dataset.option = name;
    let input;
    if (info.option_choices[name]) {
      input = document.createElement("select");
      input.append(new Option(`default (${def})`, ""));
      for (const c of info.option_choices[name]) input.append(new Option(c, c));
    } else if (typeof def === "boolean") {
      input = document.createElement("select");
      input.append(new Option(`default (${def ? "yes" : "no"})`, ""), new Option("yes", "true"), new Option("no", "false"));
    } else {
      input = document.createElement("input");
      // k and outlier_contamination also take "auto"; layers may be tensor names
      const words = name.endsWith("layer") || name === "k" || typeof def === "string";
      input.type = words ? "text" : "number";
      if (input.type === "number") input.step = "any";
      input.placeholder = def === null ? "auto" : String(def);
    }
    input.name = name;
    input.id = "opt-" + name;
    label.append(input);
    box.append(label);
  }
  showMethodOptions();
}

function showMethodOptions() {
  const select = $("#opt-method");
  const own = select && state.info.options_by_method ? state.info.options_by_method[select.value] : null;
  for (const label of $("#option-fields").querySelectorAll("label[data-option]")) {
    const shown = !own || own.includes(label.dataset.option);
    label.hidden = !shown;
    for (const el of label.querySelectorAll("input, select")) el.disabled = !shown;  // not sent when hidden
  }
}

function setFitFiles(files) {
  const { images, ignored } = splitImages(files);
  state.fitFiles = images;
  const size = images.reduce((s, f) => s + f.size, 0);
  $("#fit-chosen").textContent = images.length
    ? `${images.length} image(s), ${mib(size)}` + (ignored ? ` (${ignored} other file(s) ignored)` : "")
    : "No images chosen." + (ignored ? ` ${ignored} file(s) ignored: not images.` : "");
  const thumbs = $("#fit-thumbs");
  for (const img of thumbs.querySelectorAll("img")) URL.revokeObjectURL(img.src);
  thumbs.replaceChildren();
  for (const f of images.slice(0, 24)) {
    const img = document.createElement("img");
    img.src = URL.createObjectURL(f);
    img.alt = img.title = f.name;
    thumbs.append(img);
  }
}

async function createModel(event) {
  event.preventDefault();
  const className = $("#class-name").value.trim();
  const files = state.fitFiles;
  const limits = state.info.limits;
  const size = files.reduce((s, f) => s + f.size, 0);
  let problem = "";
  if (!className) problem = "Give a class name: what the images show (it fills the text prompts).";
  else if (!files.length) problem = "Choose or drop some normal images first.";
  else if (files.length > limits.max_fit_images) problem = `${files.length} images: this server takes at most ${limits.max_fit_images} per model.`;
  else if (size > limits.max_request_bytes) problem = `${mib(size)} of images: this server takes at most ${mib(limits.max_request_bytes)} per request.`;
  if (problem) { showMessage(problem); return; }

  const form = new FormData();
  form.append("class_name", className);
  for (const el of $("#option-fields").querySelectorAll("input, select")) {
    if (!el.disabled && el.value.trim() !== "") form.append(el.name, el.value.trim());
  }
  for (const f of files) form.append("images", f, f.name);
  const button = $("#fit-button");
  button.disabled = true;
  showMessage("");
  const started = performance.now();
  $("#fit-status").textContent = `fitting on ${files.length} image(s)…`;
  try {
    const model = await api("/models", { method: "POST", body: form });
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    await loadModels(model.id);
    $("#fit-status").textContent = `created ${model.id} in ${seconds} s`;
  } catch (err) {
    $("#fit-status").textContent = "failed";
    showMessage(errorText(err));
  } finally {
    button.disabled = false;
  }
}

// ---- scoring -----------------------------------------------------------------------------

function resultCard(file, batch, index) {
  const card = document.createElement("article");
  card.className = "result pending";
  Object.assign(card.dataset, { name: file.name, decision: "pending", batch, index });
  card.row = { name: file.name, decision: "pending" };
  card.file = file;  // kept for "mark as good"
  const pair = document.createElement("div");
  pair.className = "pair";
  for (const [cls, caption] of [["input", "image"], ["overlay", "anomaly map"]]) {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.className = cls;
    img.alt = `${caption} of ${file.name}`;
    img.addEventListener("error", () => unshown(img, "the browser cannot show this file"));
    if (cls === "input") img.src = URL.createObjectURL(file);
    const cap = document.createElement("figcaption");
    cap.textContent = caption;
    fig.append(img, cap);
    pair.append(fig);
  }
  const title = document.createElement("h4");
  title.className = "name";
  title.textContent = file.name;
  const scores = document.createElement("p");
  scores.className = "scores";
  scores.textContent = "waiting…";
  card.append(pair, title, scores);
  return card;
}

// An image the browser cannot show (a TIFF, a DICOM, a damaged file) or a map that was not made:
// a line of text in its place, not a broken-image icon.
function unshown(img, why) {
  const note = document.createElement("div");
  note.className = "unshown";
  note.textContent = why;
  img.replaceWith(note);
}

function fillCard(card, r, modelId) {
  card.classList.remove("pending");
  card.classList.add(r.anomalous ? "anomalous" : "normal");
  card.dataset.score = r.score;
  card.dataset.decision = r.out_of_scope ? "out_of_scope" : r.anomalous ? "anomalous" : "normal";
  card.row = {
    name: r.name, decision: card.dataset.decision, score: r.score, visual: r.visual, semantic: r.semantic,
    threshold: r.threshold, regions: (r.regions || []).length, width: r.width, height: r.height, model: modelId, problem: "",
  };
  card.querySelector("img.overlay").src = r.overlay_png;
  const p = card.querySelector(".scores");
  p.replaceChildren();
  const badge = document.createElement("span");
  badge.className = "badge decision";
  badge.textContent = r.out_of_scope ? "NOT THIS PRODUCT" : r.anomalous ? "ANOMALOUS" : "NORMAL";
  const text = document.createElement("span");
  const model = state.models.find((m) => m.id === modelId);
  const probe = !model || (model.description || {}).text_probe ? ` · text ${fmt(r.semantic, 3)}` : "";  // no text probe: no text score
  text.textContent = ` score ${fmt(r.score)} · visual ${fmt(r.visual)}${probe} · threshold ${fmt(r.threshold)}`;
  const small = document.createElement("div");
  small.className = "hint";
  const regions = (r.regions || []).length;
  small.textContent = `${r.width}×${r.height} px · ${regions} defect region${regions === 1 ? "" : "s"} · model ${modelId}`;
  p.append(badge, text, small);
  if (r.anomalous) p.append(markGoodButton(card, modelId));
}

// "Mark as good": the operator says this flagged image is fine. Its image joins the model's normal
// images without a refit (POST /models/{id}/normals), as a new version; the next images scored use it.
function markGoodButton(card, modelId) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "mark-good";
  button.textContent = "mark as good";
  button.title = "Add this image to the model's normal images (no refit; a new model version)";
  button.addEventListener("click", async () => {
    button.disabled = true;
    button.textContent = "adding…";
    const form = new FormData();
    form.append("images", card.file, card.file.name);
    try {
      const res = await api(`/models/${encodeURIComponent(modelId)}/normals`, { method: "POST", body: form });
      const note = document.createElement("div");
      note.className = "hint marked";
      note.textContent = `added as normal: version ${res.version} of ${modelId}, threshold ${fmt(res.threshold_before)} → ` +
        `${fmt(res.threshold_after)} (the next images scored use it)`;
      button.replaceWith(note);
      card.dataset.marked = "good";
      await loadModels(modelId);
    } catch (err) {
      button.disabled = false;
      button.textContent = "mark as good";
      showMessage(`${card.file.name} was not added: ${errorText(err)}`);
    }
  });
  return button;
}

function failCard(card, problem) {
  card.classList.remove("pending");
  card.classList.add("failed");
  card.dataset.decision = "failed";
  card.row = { ...card.row, decision: "failed", problem };
  const map = card.querySelector("img.overlay");
  if (map) unshown(map, "no map: not scored");
  card.querySelector(".scores").textContent = "not scored: " + problem;
}

// ---- the results: sort, filter, CSV --------------------------------------------------------

// Decisions in the order "decision, then score" lists them.
const DECISION_RANK = { anomalous: 0, out_of_scope: 1, normal: 2, failed: 3, pending: 4 };

function cardScore(card) {
  const x = parseFloat(card.dataset.score);
  return Number.isFinite(x) ? x : -Infinity;  // not scored: after every score
}

const SORTS = {
  order: (a, b) => (b.dataset.batch - a.dataset.batch) || (a.dataset.index - b.dataset.index),
  "score-desc": (a, b) => cardScore(b) - cardScore(a),
  "score-asc": (a, b) => (cardScore(a) === -Infinity) - (cardScore(b) === -Infinity) || cardScore(a) - cardScore(b),
  decision: (a, b) => (DECISION_RANK[a.dataset.decision] - DECISION_RANK[b.dataset.decision]) || cardScore(b) - cardScore(a),
  name: (a, b) => a.dataset.name.localeCompare(b.dataset.name, undefined, { numeric: true }),
};

// Sort the cards and hide those the filters leave out; ties keep the order they had.
function applyView() {
  const results = $("#results");
  const cards = Array.from(results.children);
  const by = SORTS[$("#sort-by").value] || SORTS.order;
  const only = $("#show-only").value;
  const text = $("#name-filter").value.trim().toLowerCase();
  cards.sort(by).forEach((c) => results.append(c));
  let shown = 0;
  for (const c of cards) {
    c.hidden = (only !== "all" && c.dataset.decision !== only) || (text !== "" && !c.dataset.name.toLowerCase().includes(text));
    shown += c.hidden ? 0 : 1;
  }
  $("#results-tools").hidden = cards.length === 0;
  $("#shown-count").textContent = cards.length ? `${shown} of ${cards.length} shown` : "";
}

const CSV_COLUMNS = ["name", "decision", "score", "visual", "semantic", "threshold", "regions", "width", "height", "model", "problem"];

function csvField(value) {
  let text = value === null || value === undefined ? "" : String(value);
  if (typeof value === "string" && /^[=+\-@\t\r]/.test(text)) text = "'" + text;  // not a formula in a spreadsheet
  return /[",\n\r]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

// The rows shown, in the order shown, as a CSV file named after the model.
function downloadCsv() {
  const rows = Array.from($("#results").children).filter((c) => !c.hidden).map((c) => c.row);
  const lines = [CSV_COLUMNS.join(","), ...rows.map((r) => CSV_COLUMNS.map((k) => csvField(r[k])).join(","))];
  const url = URL.createObjectURL(new Blob([lines.join("\r\n") + "\r\n"], { type: "text/csv" }));
  const a = document.createElement("a");
  a.href = url;
  a.download = `lakead-results-${(currentModel() || { id: "none" }).id}.csv`;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

// One request per image (a few in flight): a file the service cannot read fails alone, and
// every other image is still scored.
const IN_FLIGHT = 2;

async function scoreFiles(files) {
  const { images, ignored } = splitImages(files);
  const model = currentModel();
  if (!model) { showMessage("Pick a stored model or create one first."); return; }
  if (!images.length) { showMessage("None of the dropped files is an image."); return; }
  showMessage(ignored ? `${ignored} file(s) ignored: not images.` : "", "info");
  const thresholdValue = $("#threshold").value.trim();
  const results = $("#results");
  const batch = ++state.batches;
  const cards = images.map((f, i) => resultCard(f, batch, i));
  cards.slice().reverse().forEach((c) => results.prepend(c));
  applyView();
  let done = 0, anomalous = 0;
  const failures = [];
  const status = $("#predict-status");
  const limits = state.info.limits;
  const show = () => { status.textContent = `scoring with ${model.id}: ${done} of ${images.length} done…`; };

  async function one(i) {
    const file = images[i], card = cards[i];
    if (file.size > limits.max_request_bytes) {
      const problem = `file of ${mib(file.size)} is larger than the server's limit`;
      failCard(card, problem);
      failures.push(`${file.name}: ${problem}`);
      return;
    }
    const form = new FormData();
    form.append("images", file, file.name);
    if (thresholdValue) form.append("threshold", thresholdValue);
    try {
      const res = await api(`/models/${encodeURIComponent(model.id)}/predict`, { method: "POST", body: form });
      const r = res.results[0];
      fillCard(card, r, model.id);
      anomalous += r.anomalous ? 1 : 0;
    } catch (err) {
      const problem = (err.errors && err.errors.length ? err.errors[0].problem : "") || err.message;
      failCard(card, problem);
      failures.push(`${file.name}: ${problem}`);
    }
  }

  let next = 0;
  show();
  async function worker() {
    while (next < images.length) {
      const i = next++;
      await one(i);
      done += 1;
      show();
      applyView();
    }
  }
  await Promise.all(Array.from({ length: Math.min(IN_FLIGHT, images.length) }, worker));
  const failed = failures.length;
  status.textContent = `${done - failed} image(s) scored with ${model.id}: ${anomalous} anomalous` + (failed ? `, ${failed} not scored` : "");
  if (failed) showMessage(`${failed} image(s) not scored:\n` + failures.map((f) => "• " + f).join("\n"));
}

function clearResults() {
  for (const img of $("#results").querySelectorAll("img.input")) URL.revokeObjectURL(img.src);
  $("#results").replaceChildren();
  $("#predict-status").textContent = "";
  applyView();
}

// ---- start -------------------------------------------------------------------------------

async function connect() {
  try {
    const health = await api("/healthz");
    state.authRequired = health.auth_required;
    $("#server-status").textContent = `lakead ${health.version}`;
    $("#server-status").className = "status ok";
  } catch (err) {
    $("#server-status").textContent = "service unreachable";
    $("#server-status").className = "status down";
    showMessage(errorText(err));
    return;
  }
  if (state.authRequired && !token()) {
    askForToken();
    showMessage("This service needs a token: enter the one given to 'lakead serve --token', or open the address it printed.");
    return;
  }
  try {
    state.info = await api("/info");
    buildOptionFields();
    await loadModels();
    showMessage("");
    document.body.dataset.ready = "true";
  } catch (err) {
    showMessage(errorText(err));
  }
}

document.addEventListener("DOMContentLoaded", () => {
  takeTokenFromAddress();
  $("#token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("#token").value.trim());
    $("#token-form").hidden = true;
    connect();
  });
  $("#model-select").addEventListener("change", showModel);
  $("#delete-model").addEventListener("click", deleteModel);
  $("#fit-form").addEventListener("submit", createModel);
  $("#clear-results").addEventListener("click", clearResults);
  $("#sort-by").addEventListener("change", applyView);
  $("#show-only").addEventListener("change", applyView);
  $("#name-filter").addEventListener("input", applyView);
  $("#download-csv").addEventListener("click", downloadCsv);
  setupDrop($("#fit-drop"), $("#fit-files"), setFitFiles);
  setupDrop($("#test-drop"), $("#test-files"), scoreFiles);
  // A file dropped beside a drop zone must not make the browser leave the page.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  connect();
});
