// fewshot recogniser web page: plain JavaScript over the JSON API (no framework, no build step).
// The workspace id and API key live in localStorage; every workspace call sends them as a Bearer key.
"use strict";

const STORAGE_KEY = "fewshot.workspace";
const TOP_K = 5; // classes shown and nearest examples asked of /explain
const $ = (id) => document.getElementById(id);

let workspace = null; // {id, name, key, model}
let models = []; // GET /models: the served models, the default first
let teachFiles = []; // File/Blob objects waiting to be taught
let blobUrls = []; // object URLs of class thumbnails, revoked on each re-render
let cameraTarget = null; // "teach" | "classify" while the camera dialog is open

// -- messages ------------------------------------------------------------------------------------
function showError(err) {
  $("message-text").textContent = err instanceof Error ? err.message : String(err);
  $("message").className = "message error";
  $("message").hidden = false;
}

function showInfo(text) {
  $("message-text").textContent = text;
  $("message").className = "message info";
  $("message").hidden = false;
}

function clearMessage() {
  $("message").hidden = true;
}

// -- API -----------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// fetch + the service's error shape {"error": {"code", "message"}} turned into an ApiError.
async function api(method, path, { body, key, raw } = {}) {
  const headers = {};
  const auth = key ?? workspace?.key;
  if (auth) headers.Authorization = `Bearer ${auth}`;
  let payload = body;
  if (body && !(body instanceof FormData)) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, { method, headers, body: payload });
  } catch (err) {
    throw new ApiError(0, "network", `could not reach the server (${err.message})`);
  }
  if (!res.ok) {
    let code = `http_${res.status}`;
    let message = `${res.status} ${res.statusText}`;
    try {
      const data = await res.json();
      if (data && data.error) ({ code, message } = data.error);
    } catch (_) { /* not JSON: keep the status line */ }
    if (res.status === 401 && !key && workspace) message += " (open the workspace again with its API key)";
    throw new ApiError(res.status, code, message);
  }
  if (raw) return res;
  return res.status === 204 ? null : res.json();
}

const wsPath = (suffix = "") => `/workspaces/${encodeURIComponent(workspace.id)}${suffix}`;

function imagesForm(files, extra = {}) {
  const form = new FormData();
  for (const f of files) form.append("images", f, f.name || "snapshot.png");
  for (const [k, v] of Object.entries(extra)) form.append(k, v);
  return form;
}

// Run an async UI action: disable its button while it runs, report failures in the message area.
async function guarded(button, action) {
  if (button) button.disabled = true;
  document.body.classList.add("busy");
  try {
    clearMessage();
    await action();
  } catch (err) {
    showError(err);
  } finally {
    if (button) button.disabled = false;
    document.body.classList.remove("busy");
  }
}

// -- models --------------------------------------------------------------------------------------
const MODES = { L: "grayscale", RGB: "RGB" }; // image modes of GET /models, as the page names them

// A served model as the page names it: "photos — RGB 224x224".
function modelText(m) {
  return `${m.name} — ${MODES[m.mode] ?? m.mode} ${m.size}x${m.size}`;
}

function describeModel(name) {
  const m = models.find((x) => x.name === name);
  return m ? modelText(m) : name;
}

// The create form's model choice (the default model selected; with one model served it is shown,
// not offered), the footer's list, and the open workspace's model with its image mode and size.
function renderModels() {
  const select = $("create-model");
  select.replaceChildren(...models.map((m) => new Option(modelText(m), m.name, m.default, m.default)));
  select.disabled = models.length < 2;
  $("model-info").textContent = models.map((m) => `${m.name} (${m.backbone ?? "model"} · ${m.bundle_id.slice(0, 12)})`).join(", ");
  if (workspace) showWorkspaceModel();
}

function loadModels() {
  fetch("/models").then((r) => (r.ok ? r.json() : null)).then((list) => {
    if (!list) {
      $("model-info").textContent = "not ready";
      return;
    }
    models = list;
    renderModels();
  }).catch(() => { $("model-info").textContent = "unreachable"; });
}

function showWorkspaceModel() {
  $("ws-model").textContent = workspace.model ? describeModel(workspace.model) : "…";
}

// A workspace kept in localStorage without its model (by an earlier version of this page): ask the API.
async function loadWorkspaceModel() {
  const ws = await api("GET", wsPath());
  if (workspace?.id !== ws.id) return;
  workspace.model = ws.model;
  localStorage.setItem(STORAGE_KEY, JSON.stringify(workspace));
  showWorkspaceModel();
}

// -- workspace -----------------------------------------------------------------------------------
function loadWorkspace() {
  try {
    const w = JSON.parse(localStorage.getItem(STORAGE_KEY) || "null");
    return w && w.id && w.key ? w : null;
  } catch (_) {
    return null;
  }
}

function setWorkspace(w) {
  workspace = w;
  if (w) localStorage.setItem(STORAGE_KEY, JSON.stringify(w));
  else localStorage.removeItem(STORAGE_KEY);
  $("connect").hidden = !!w;
  $("workspace").hidden = !w;
  $("ws-status").hidden = !w;
  $("result").hidden = true;
  if (w) {
    $("ws-name").textContent = w.name || "";
    $("ws-id").textContent = w.id;
    showWorkspaceModel();
    if (!w.model) loadWorkspaceModel().catch(showError);
    refreshClasses().catch(showError);
  } else {
    $("new-key").hidden = true;
  }
}

async function createWorkspace(event) {
  event.preventDefault();
  const name = $("create-name").value.trim();
  const admin = $("create-admin").value;
  const model = $("create-model").value; // "": models not loaded, the service's default
  const ws = await api("POST", "/workspaces", { body: model ? { name, model } : { name }, key: admin });
  $("create-admin").value = "";
  setWorkspace({ id: ws.id, name: ws.name, key: ws.api_key, model: ws.model });
  $("new-key-value").textContent = ws.api_key;
  $("new-key").hidden = false;
}

async function openWorkspace(event) {
  event.preventDefault();
  const id = $("open-id").value.trim();
  const key = $("open-key").value.trim();
  const ws = await api("GET", `/workspaces/${encodeURIComponent(id)}`, { key });
  $("open-key").value = "";
  setWorkspace({ id: ws.id, name: ws.name, key, model: ws.model });
}

// -- classes -------------------------------------------------------------------------------------
async function thumbnailUrl(exampleId) {
  const res = await api("GET", wsPath(`/examples/${encodeURIComponent(exampleId)}/thumbnail.png`), { raw: true });
  const url = URL.createObjectURL(await res.blob());
  blobUrls.push(url);
  return url;
}

async function refreshClasses() {
  document.dispatchEvent(new Event("fewshot:classes-changed")); // panel.js, threshold.js refresh alongside the list
  const classes = await api("GET", wsPath("/classes"));
  // Fetch every class's examples and thumbnails before touching the DOM, so a re-render is atomic.
  const details = await Promise.all(classes.map((c) => api("GET", wsPath(`/classes/${encodeURIComponent(c.id)}`))));
  const old = blobUrls;
  blobUrls = [];
  const thumbs = await Promise.all(details.map((d) => Promise.all((d.example_ids || []).slice(0, 6).map(thumbnailUrl))));
  const list = $("classes");
  list.replaceChildren(...details.map((c, i) => classItem(c, thumbs[i])));
  old.forEach((u) => URL.revokeObjectURL(u));
  $("classes-empty").hidden = classes.length > 0;
  const images = classes.reduce((n, c) => n + c.n_examples, 0);
  $("classes-count").textContent = classes.length ? `(${classes.length} classes, ${images} images)` : "";
}

function classItem(c, urls) {
  const li = $("class-template").content.firstElementChild.cloneNode(true);
  li.dataset.classId = c.id;
  li.querySelector(".class-label").textContent = c.label;
  li.querySelector(".class-count").textContent = `${c.n_examples} image${c.n_examples === 1 ? "" : "s"}`;
  const box = li.querySelector(".class-thumbs");
  for (const url of urls) {
    const img = document.createElement("img");
    img.src = url;
    img.alt = `example of ${c.label}`;
    box.append(img);
  }
  const form = li.querySelector(".rename-form");
  const input = li.querySelector(".rename-input");
  input.setAttribute("aria-label", `New name for ${c.label}`);
  li.querySelector(".rename").setAttribute("aria-label", `Rename ${c.label}`);
  li.querySelector(".rename").addEventListener("click", () => {
    form.hidden = false;
    input.value = c.label;
    input.focus();
    input.select();
  });
  li.querySelector(".rename-cancel").addEventListener("click", () => { form.hidden = true; });
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    guarded(form.querySelector("button[type=submit]"), async () => {
      await api("PATCH", wsPath(`/classes/${encodeURIComponent(c.id)}`), { body: { label: input.value.trim() } });
      await refreshClasses();
    });
  });
  const del = li.querySelector(".delete");
  del.setAttribute("aria-label", `Delete ${c.label}`);
  del.addEventListener("click", () => {
    if (!window.confirm(`Delete class "${c.label}" and its ${c.n_examples} images?`)) return;
    guarded(del, async () => {
      await api("DELETE", wsPath(`/classes/${encodeURIComponent(c.id)}`));
      await refreshClasses();
    });
  });
  const add = li.querySelector(".add-input");
  add.setAttribute("aria-label", `Add images to ${c.label}`);
  add.addEventListener("change", () => {
    const files = [...add.files];
    add.value = "";
    if (files.length) addImages(c, files);
  });
  // Dropping images onto a class card adds them to that class.
  dropTarget(li, (files) => addImages(c, files));
  return li;
}

function addImages(c, files) {
  return guarded(null, async () => {
    const rec = await api("POST", wsPath(`/classes/${encodeURIComponent(c.id)}/images`), { body: imagesForm(files) });
    await refreshClasses();
    showInfo(`Added ${files.length} image${files.length === 1 ? "" : "s"} to "${rec.label}" (${rec.n_examples} in all).`);
  });
}

// -- teaching ------------------------------------------------------------------------------------
function fileChip(f) {
  const chip = document.createElement("span");
  chip.className = "file-chip";
  chip.textContent = f.name || "file";
  chip.title = `${f.name}: no preview (not an image this browser can show)`;
  return chip;
}

function renderTeachPreview() {
  const box = $("teach-preview");
  box.querySelectorAll("img").forEach((img) => URL.revokeObjectURL(img.src));
  box.replaceChildren(...teachFiles.map((f, i) => {
    if (f.type && !f.type.startsWith("image/")) return fileChip(f);
    const img = document.createElement("img");
    img.src = URL.createObjectURL(f);
    img.alt = `image ${i + 1} to teach: ${f.name || "snapshot"}`;
    img.addEventListener("error", () => img.replaceWith(fileChip(f)), { once: true });
    return img;
  }));
  const n = teachFiles.length;
  $("teach-submit").textContent = n ? `Teach class (${n} image${n === 1 ? "" : "s"})` : "Teach class";
}

function addTeachFiles(files) {
  teachFiles = teachFiles.concat(files);
  renderTeachPreview();
}

async function teach(event) {
  event.preventDefault();
  const label = $("teach-label").value.trim();
  if (!teachFiles.length) throw new Error("choose or drop at least one image of the class first");
  const rec = await api("POST", wsPath("/classes"), { body: imagesForm(teachFiles, { label }) });
  teachFiles = [];
  $("teach-label").value = "";
  renderTeachPreview();
  await refreshClasses();
  showInfo(`Taught "${rec.label}" from ${rec.n_examples} images.`);
}

// -- classification ------------------------------------------------------------------------------
const percent = (p) => `${(100 * p).toFixed(1)}%`;

async function classify(file) {
  const form = new FormData();
  form.append("image", file, file.name || "snapshot.png");
  form.append("k", TOP_K);
  const out = await api("POST", wsPath("/explain"), { body: form });
  const p = out.prediction;
  const old = $("result-query").src;
  if (old.startsWith("blob:")) URL.revokeObjectURL(old);
  $("result-query").src = URL.createObjectURL(file);
  $("result-query").alt = `image classified: ${p.image}`;
  const verdict = $("result-verdict");
  verdict.textContent = p.known ? p.label : "unknown";
  verdict.className = p.known ? "verdict known" : "verdict unknown";
  $("result-detail").textContent = p.summary; // the service's words (fewshot.service.verdict)
  $("result-advice").textContent = p.advice;
  const meter = $("result-confidence-bar");
  meter.setAttribute("aria-valuenow", (100 * p.confidence).toFixed(1));
  meter.firstElementChild.style.width = percent(p.confidence);
  meter.querySelector(".limit").hidden = p.threshold === null;
  $("result-confidence-value").textContent = percent(p.confidence);
  $("result-confidence").className = p.known ? "confidence known" : "confidence unknown";
  $("result-confidence").hidden = false;
  $("result-top-title").textContent = p.known ? "Top classes" : "Nearest classes (none close enough)";
  const warning = $("result-domain");
  const model = workspace.model ? `the '${workspace.model}' model` : "the model";
  warning.hidden = !p.out_of_domain;
  warning.textContent = p.out_of_domain
    ? `Warning: this image does not look like what ${model} was trained on (${(p.domain_reasons || []).join("; ") || "far from its training images"}); do not trust the answer.`
    : "";
  $("result-top").replaceChildren(...p.top_k.map((c) => {
    const li = document.createElement("li");
    const name = document.createElement("span");
    name.className = "bar-label";
    name.textContent = c.label;
    name.title = c.label;
    if (!p.known) { // an unknown answer has no class to be confident in: names only, no share bars
      li.className = "nearest";
      li.append(name);
      return li;
    }
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.setAttribute("role", "meter");
    bar.setAttribute("aria-valuemin", "0");
    bar.setAttribute("aria-valuemax", "100");
    bar.setAttribute("aria-valuenow", (100 * c.probability).toFixed(1));
    bar.setAttribute("aria-label", `${c.label} confidence`);
    const fill = document.createElement("span");
    fill.style.width = percent(c.probability);
    bar.append(fill);
    const value = document.createElement("span");
    value.className = "bar-value";
    value.textContent = percent(c.probability);
    li.append(name, bar, value);
    return li;
  }));
  $("result-neighbours").replaceChildren(...out.neighbours.map((n) => {
    const li = document.createElement("li");
    const img = document.createElement("img");
    img.src = `data:image/png;base64,${n.thumbnail_png_base64}`;
    img.alt = `stored example of ${n.label}`;
    const cap = document.createElement("span");
    cap.textContent = n.label;
    li.append(img, cap);
    return li;
  }));
  $("result").hidden = false;
  document.dispatchEvent(new CustomEvent("fewshot:classified", { detail: { file } })); // panel.js: occlusion map
}

// -- drag and drop, camera -----------------------------------------------------------------------
function imageFiles(list) {
  const files = [...list].filter((f) => f.type === "" || f.type.startsWith("image/"));
  if (files.length < list.length) showError(`${list.length - files.length} dropped file(s) are not images and were left out`);
  return files;
}

function dropTarget(el, onFiles) {
  el.addEventListener("dragover", (e) => { e.preventDefault(); el.classList.add("over"); });
  el.addEventListener("dragleave", () => el.classList.remove("over"));
  el.addEventListener("drop", (e) => {
    e.preventDefault();
    e.stopPropagation();
    el.classList.remove("over");
    const files = imageFiles(e.dataTransfer.files);
    if (files.length) onFiles(files);
  });
}

async function setupCamera() {
  if (!navigator.mediaDevices?.enumerateDevices || !navigator.mediaDevices.getUserMedia) return;
  try {
    const devices = await navigator.mediaDevices.enumerateDevices();
    if (!devices.some((d) => d.kind === "videoinput")) return;
  } catch (_) {
    return;
  }
  document.querySelectorAll(".camera-button").forEach((b) => {
    b.hidden = false;
    b.addEventListener("click", () => guarded(b, () => openCamera(b.dataset.target)));
  });
  $("camera-close").addEventListener("click", closeCamera);
  $("camera").addEventListener("close", closeCamera);
  $("camera-snap").addEventListener("click", () => guarded($("camera-snap"), snapshot));
}

async function openCamera(target) {
  cameraTarget = target;
  const video = $("camera-video");
  video.srcObject = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
  $("camera").showModal();
}

function closeCamera() {
  const video = $("camera-video");
  if (video.srcObject) video.srcObject.getTracks().forEach((t) => t.stop());
  video.srcObject = null;
  if ($("camera").open) $("camera").close();
}

async function snapshot() {
  const video = $("camera-video");
  const canvas = document.createElement("canvas");
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  canvas.getContext("2d").drawImage(video, 0, 0);
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  const file = new File([blob], `snapshot-${Date.now()}.png`, { type: "image/png" });
  if (cameraTarget === "teach") addTeachFiles([file]);
  else {
    closeCamera();
    await classify(file);
  }
}

// -- wiring --------------------------------------------------------------------------------------
function init() {
  $("message-close").addEventListener("click", clearMessage);
  $("create-form").addEventListener("submit", (e) => guarded(e.submitter, () => createWorkspace(e)));
  $("open-form").addEventListener("submit", (e) => guarded(e.submitter, () => openWorkspace(e)));
  $("new-key-ok").addEventListener("click", () => { $("new-key").hidden = true; });
  $("ws-leave").addEventListener("click", () => { clearMessage(); setWorkspace(null); });
  $("classes-refresh").addEventListener("click", (e) => guarded(e.currentTarget, refreshClasses));

  $("teach-form").addEventListener("submit", (e) => {
    e.preventDefault();
    guarded($("teach-submit"), () => teach(e));
  });
  $("teach-files").addEventListener("change", (e) => {
    addTeachFiles([...e.target.files]);
    e.target.value = "";
  });
  $("teach-clear").addEventListener("click", () => { teachFiles = []; renderTeachPreview(); });
  dropTarget($("teach-drop"), addTeachFiles);

  $("classify-file").addEventListener("change", (e) => {
    const file = e.target.files[0];
    e.target.value = "";
    if (file) guarded(null, () => classify(file));
  });
  dropTarget($("classify-drop"), (files) => guarded(null, () => classify(files[0])));
  // Keyboard users open the file pickers from the focused drop zones.
  for (const [zone, input] of [["teach-drop", "teach-files"], ["classify-drop", "classify-file"]]) {
    $(zone).addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $(input).click(); }
    });
  }

  loadModels();
  setupCamera();
  setWorkspace(loadWorkspace());
}

init();
