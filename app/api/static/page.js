// The page at /: drop an image, see its cells over it, download them in the formats lab tools open.
// Everything goes to this service's own /segment; nothing is loaded from anywhere else.
"use strict";

const $ = (id) => document.getElementById(id);
let current = null; // the file last segmented, for the downloads

function apiHeaders() {
  const key = sessionStorage.getItem("cellseg-api-key");
  return key ? { "X-API-Key": key } : {};
}

async function post(file, format) {
  const params = new URLSearchParams({ format, mode: $("mode").value });
  if ($("model-version").value) params.set("model", $("model-version").value);
  if ($("channel").value.trim()) params.set("channel", $("channel").value.trim());
  const form = new FormData();
  form.append("file", file, file.name);
  const response = await fetch(`/segment?${params}`, { method: "POST", body: form, headers: apiHeaders() });
  if (!response.ok) throw await problem(response);
  return response;
}

async function problem(response) {
  if (response.status === 401) $("key-field").hidden = false;
  let detail = response.statusText;
  try { detail = (await response.json()).detail; } catch { /* not JSON: keep the status text */ }
  return new Error(`${response.status}: ${detail}`);
}

function showError(error) {
  $("error").textContent = error.message;
  $("error").hidden = false;
}

async function segment(file) {
  current = file;
  $("error").hidden = true;
  $("result").hidden = true;
  const started = performance.now();
  const ticker = setInterval(() => {
    $("status").textContent = `Finding the cells of ${file.name}… ${((performance.now() - started) / 1000).toFixed(0)} s`;
  }, 250);
  try {
    const response = await post(file, "overlay");
    const overlay = $("overlay");
    if (overlay.src) URL.revokeObjectURL(overlay.src);
    overlay.src = URL.createObjectURL(await response.blob());
    const frames = response.headers.get("X-Frame-Count");
    $("count").textContent = response.headers.get("X-Cell-Count");
    const probability = Number(response.headers.get("X-Cell-Type-Probability"));
    $("cell-type").textContent = response.headers.get("X-Cell-Type")
      ? `${response.headers.get("X-Cell-Type")} (${Math.round(probability * 100)} %)` : "–";
    $("mode-ran").textContent = response.headers.get("X-Mode");
    $("model-ran").textContent = response.headers.get("X-Model-Version");
    $("took").textContent = `${((performance.now() - started) / 1000).toFixed(1)} s`;
    $("result").hidden = false;
    $("status").textContent = frames ? `${file.name}: a stack of ${frames} frames` : file.name;
  } catch (error) {
    $("status").textContent = "";
    showError(error);
    listModels(); // a 409: the model chosen was unloaded meanwhile
  } finally {
    clearInterval(ticker);
  }
}

async function download(button) {
  if (!current) return;
  button.disabled = true;
  try {
    const blob = await (await post(current, button.dataset.format)).blob();
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = current.name.replace(/\.[^.]+$/, "") + button.dataset.suffix;
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  } catch (error) {
    showError(error);
  } finally {
    button.disabled = false;
  }
}

async function describeModel() {
  try {
    const ready = await (await fetch("/ready", { headers: apiHeaders() })).json();
    $("model").textContent = ready.model_version
      ? `model ${ready.model_version} on ${ready.device} (${ready.status})`
      : ready.detail || ready.status;
  } catch {
    $("model").textContent = "the service does not answer";
  }
}

// The model chooser: the versions loaded (GET /models), ready ones only, the default first; keeps the choice while
// it stays loaded.
async function listModels() {
  const chooser = $("model-version");
  try {
    const response = await fetch("/models", { headers: apiHeaders() });
    if (!response.ok) return;
    const models = await response.json();
    const chosen = chooser.value;
    const ready = models.loaded.filter((model) => model.ready);
    chooser.replaceChildren(...ready.map((model) => {
      const option = document.createElement("option");
      option.value = model.version;
      option.textContent = model.default ? `${model.version} (default)` : model.version;
      return option;
    }));
    chooser.value = ready.some((model) => model.version === chosen) ? chosen : models.default;
  } catch { /* the service does not answer: describeModel says so */ }
}

function wire() {
  const drop = $("drop");
  $("file").addEventListener("change", () => $("file").files[0] && segment($("file").files[0]));
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files[0]) segment(event.dataTransfer.files[0]);
  });
  $("key").addEventListener("change", () => {
    sessionStorage.setItem("cellseg-api-key", $("key").value);
    describeModel();
    listModels();
    if (current) segment(current);
  });
  $("model-version").addEventListener("focus", listModels);
  for (const button of document.querySelectorAll(".downloads button")) {
    button.addEventListener("click", () => download(button));
  }
  describeModel();
  listModels();
}

wire();
