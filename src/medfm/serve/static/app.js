// medfm's browser app: open an image, prompt the server's model with boxes and clicks, keep a
// label map per slice (several labels, undo/redo), export it through the API, classify the image
// and ask questions about it. No build step.
"use strict";

const PALETTE = ["#e6194b", "#3cb44b", "#ffe119", "#0082c8", "#f58230", "#911eb4", "#46f0f0", "#f032e6"];
const $ = (id) => document.getElementById(id);

const state = {
  token: null,
  image: null,          // GET /v1/images/{id} answer
  slice: 0,
  labels: [],           // [{value, name, colour}]
  current: 1,           // the label value new masks get
  maps: new Map(),      // slice -> Uint8Array(H*W) label map
  dirty: new Set(),     // slices changed since the server last got them
  undo: [], redo: [],   // [{changes: [{slice, before, after}]}]
  session: null,        // the object being prompted: {slice, label, base, box, points: [[x, y, l]]}
  drag: null,           // mouse-down position while drawing a box
  bitmaps: new Map(),   // "slice/window" -> ImageBitmap
  sync: Promise.resolve(),
  warmTimer: null,      // pending warmSlice call
};

// ------------------------------------------------------------------------------------ API
function headers(extra = {}) {
  return state.token ? { ...extra, Authorization: `Bearer ${state.token}` } : extra;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers) });
  if (!response.ok) {
    let detail = `${response.status} ${response.statusText}`;
    try { detail = (await response.json()).detail || detail; } catch (_) { /* not JSON */ }
    throw new Error(detail);
  }
  return response;
}

const postJson = (path, body) => api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function busy(text, work) {
  document.body.dataset.busy = "1";
  setStatus(text);
  try {
    const result = await work();
    setStatus("");
    return result;
  } catch (error) {
    setStatus(error.message, true);
    return undefined;
  } finally {
    document.body.dataset.busy = "0";
  }
}

// ------------------------------------------------------------------------------------ PNG
// Grey 8-bit PNGs both ways, so label maps travel losslessly (the server reads and writes them).
const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});

function crc32(bytes) {
  let c = 0xffffffff;
  for (const b of bytes) c = CRC_TABLE[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function chunk(type, data) {
  const out = new Uint8Array(12 + data.length);
  const view = new DataView(out.buffer);
  view.setUint32(0, data.length);
  out.set(new TextEncoder().encode(type), 4);
  out.set(data, 8);
  view.setUint32(8 + data.length, crc32(out.subarray(4, 8 + data.length)));
  return out;
}

async function encodeGreyPng(width, height, values) {
  const raw = new Uint8Array((width + 1) * height);  // filter byte 0 before each row
  for (let y = 0; y < height; y++) raw.set(values.subarray(y * width, (y + 1) * width), y * (width + 1) + 1);
  const zlib = new Uint8Array(await new Response(new Blob([raw]).stream().pipeThrough(new CompressionStream("deflate"))).arrayBuffer());
  const header = new Uint8Array(13);
  const view = new DataView(header.buffer);
  view.setUint32(0, width);
  view.setUint32(4, height);
  header.set([8, 0, 0, 0, 0], 8);  // 8 bit, grey, deflate, no filter, no interlace
  const signature = new Uint8Array([137, 80, 78, 71, 13, 10, 26, 10]);
  return new Blob([signature, chunk("IHDR", header), chunk("IDAT", zlib), chunk("IEND", new Uint8Array())], { type: "image/png" });
}

async function decodeGreyPng(blob) {
  const bitmap = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(bitmap, 0, 0);
  const rgba = context.getImageData(0, 0, bitmap.width, bitmap.height).data;
  const values = new Uint8Array(bitmap.width * bitmap.height);
  for (let i = 0; i < values.length; i++) values[i] = rgba[4 * i];
  return values;
}

// ------------------------------------------------------------------------------------ image
function grid() {
  const shape = state.image.shape;
  return state.image.kind === "volume" ? [shape[1], shape[2]] : [shape[0], shape[1]];
}

function labelMap(slice) {
  if (!state.maps.has(slice)) {
    const [height, width] = grid();
    state.maps.set(slice, new Uint8Array(height * width));
  }
  return state.maps.get(slice);
}

async function openFile(file) {
  const form = new FormData();
  form.append("file", file, file.name);
  if ($("modality").value) form.append("modality", $("modality").value);
  const info = await busy(`uploading ${file.name}…`, async () => (await api("/v1/images", { method: "POST", body: form })).json());
  if (!info) return;
  if (state.image) api(`/v1/images/${state.image.id}`, { method: "DELETE" }).catch(() => {});  // the app shows one image at a time
  Object.assign(state, { image: info, slice: info.kind === "volume" ? Math.floor(info.slices / 2) : 0, maps: new Map(),
    dirty: new Set(), undo: [], redo: [], session: null, bitmaps: new Map() });
  $("probabilities").replaceChildren();
  $("answer").hidden = true;
  $("prompt").textContent = "";
  $("name").textContent = `${info.name} · ${info.shape.join("×")} · ${info.modality || "modality unknown"}`;
  $("stage").hidden = false;
  $("slicebar").hidden = info.kind !== "volume";
  $("slice").max = info.slices - 1;
  $("z0").max = $("z1").max = info.slices - 1;
  $("export").disabled = $("classify").disabled = $("ask").disabled = false;
  $("format").querySelector('[value="dicom-seg"]').disabled = info.format !== "dicom";
  $("format").querySelector('[value="png"]').disabled = info.kind === "volume";
  $("format").value = "nifti";
  const [height, width] = grid();
  for (const canvas of [$("image"), $("overlay")]) { canvas.width = width; canvas.height = height; }
  fitStage();
  await showSlice(state.slice);
  updateButtons();
}

// The slice fills the space left of the panel, up to the window's height, at any zoom factor.
function fitStage() {
  if (!state.image) return;
  const [height, width] = grid();
  const room = [$("viewer").clientWidth - 2, window.innerHeight - $("stage").getBoundingClientRect().top - 90];
  const scale = Math.max(0.1, Math.min(room[0] / width, room[1] / height));
  $("image").style.width = `${Math.floor(width * scale)}px`;
  $("image").style.height = `${Math.floor(height * scale)}px`;
}

async function showSlice(slice) {
  state.slice = slice;
  $("slice").value = slice;
  $("slice-text").textContent = `slice ${slice} / ${state.image.slices - 1}`;
  const window = $("window").value;
  const key = `${slice}/${window}`;
  if (!state.bitmaps.has(key)) {
    const response = await api(`/v1/images/${state.image.id}/slices/${slice}.png?window=${window}`);
    if (state.bitmaps.size > 64) state.bitmaps.delete(state.bitmaps.keys().next().value);
    state.bitmaps.set(key, await createImageBitmap(await response.blob()));
  }
  if (state.slice !== slice) return;  // the user scrolled on meanwhile
  $("image").getContext("2d").drawImage(state.bitmaps.get(key), 0, 0);
  drawOverlay();
  clearTimeout(state.warmTimer);
  state.warmTimer = setTimeout(() => warmSlice(slice), 300);
}

// Encode the slice the user rests on before the first prompt, so that prompt costs the decoder only.
function warmSlice(slice) {
  if (!state.image || state.slice !== slice) return;
  const model = encodeURIComponent($("model").value || "");
  api(`/v1/images/${state.image.id}/slices/${slice}/embedding?model=${model}`, { method: "POST" }).catch(() => {});
}

function drawOverlay() {
  const canvas = $("overlay");
  const context = canvas.getContext("2d");
  const [height, width] = grid();
  const pixels = context.createImageData(width, height);
  const alpha = Math.round(255 * Number($("opacity").value));
  const colours = new Map(state.labels.map((label) => [label.value, hexToRgb(label.colour)]));
  const map = state.maps.get(state.slice);
  if (map) {
    for (let i = 0; i < map.length; i++) {
      if (map[i] === 0) continue;
      const [r, g, b] = colours.get(map[i]) || [255, 255, 255];
      pixels.data.set([r, g, b, alpha], 4 * i);
    }
  }
  context.putImageData(pixels, 0, 0);
  const session = state.session;
  const line = Math.max(1, width / 400);
  if (session && session.slice === state.slice) {
    if (session.box) {
      const [x0, y0, x1, y1] = session.box;
      context.setLineDash([4 * line, 3 * line]);
      context.lineWidth = line;
      context.strokeStyle = "#fff";
      context.strokeRect(x0, y0, x1 - x0, y1 - y0);
      context.setLineDash([]);
    }
    for (const [x, y, positive] of session.points) {
      context.beginPath();
      context.arc(x, y, 3 * line, 0, 2 * Math.PI);
      context.fillStyle = positive ? "#3cb44b" : "#e6194b";
      context.fill();
      context.strokeStyle = "#000";
      context.stroke();
    }
  }
  if (state.drag && state.drag.now) {
    const [x0, y0] = state.drag.start, [x1, y1] = state.drag.now;
    context.lineWidth = line;
    context.strokeStyle = "#ffe119";
    context.strokeRect(Math.min(x0, x1), Math.min(y0, y1), Math.abs(x1 - x0), Math.abs(y1 - y0));
  }
}

function hexToRgb(hex) {
  return [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
}

// ------------------------------------------------------------------------------------ prompts
function imageXY(event) {
  const rect = $("overlay").getBoundingClientRect();
  const [height, width] = grid();
  const x = Math.floor(((event.clientX - rect.left) / rect.width) * width);
  const y = Math.floor(((event.clientY - rect.top) / rect.height) * height);
  return [Math.min(Math.max(x, 0), width - 1), Math.min(Math.max(y, 0), height - 1)];
}

const tool = () => document.querySelector('input[name="tool"]:checked').value;

function newSession() {
  state.session = { slice: state.slice, label: state.current, base: labelMap(state.slice).slice(), box: null, points: [] };
  return state.session;
}

function sessionFor(slice) {
  const session = state.session;
  return session && session.slice === slice && session.label === state.current ? session : newSession();
}

async function segmentSession() {
  const session = state.session;
  const request = { model: $("model").value || null };
  if (state.image.kind === "volume") request.slice = session.slice;
  if (session.box) request.boxes = [session.box];
  if (session.points.length) {
    request.points = session.points.map(([x, y]) => [x, y]);
    request.point_labels = session.points.map(([, , positive]) => positive);
  }
  $("prompt").textContent = JSON.stringify(request);
  const answer = await busy("segmenting…", async () => (await postJson(`/v1/images/${state.image.id}/segment`, request)).json());
  if (!answer || state.session !== session) return;
  const mask = await decodeGreyPng(await (await fetch(`data:image/png;base64,${answer.mask_png}`)).blob());
  const after = session.base.slice();
  for (let i = 0; i < mask.length; i++) if (mask[i]) after[i] = session.label;
  // a model never trained with a prompt kind (clicks to a box-only model) answers it unreliably: say so
  const scores = `score ${answer.scores.map((s) => s.toFixed(3)).join(", ")}`;
  setStatus(answer.warning ? `${scores} · ${answer.warning}` : scores, Boolean(answer.warning));
  apply([{ slice: session.slice, after }]);
}

async function segmentBox3d(box) {
  const [z0, z1] = [Number($("z0").value), Number($("z1").value)].sort((a, b) => a - b);
  const step = Math.max(1, Math.round(Number($("zstep").value) || 1));
  const request = {
    box3d: [box[0], box[1], z0, box[2], box[3], z1], model: $("model").value || null,
    slice_step: step, refine_below: step > 1 && $("adaptive").checked ? 0.9 : null,
  };
  $("prompt").textContent = JSON.stringify(request);
  const label = state.current;
  const answer = await busy(`segmenting slices ${z0}–${z1}…`, async () => {
    const result = await (await postJson(`/v1/images/${state.image.id}/segment`, request)).json();
    const masks = await Promise.all(result.slices.map(async (z) =>
      decodeGreyPng(await (await api(`/v1/images/${state.image.id}/mask/slices/${z}.png?mask_id=${result.mask_id}`)).blob())));
    return { slices: result.slices, masks };
  });
  if (!answer) return;
  apply(answer.slices.map((z, k) => {
    const after = labelMap(z).slice();
    answer.masks[k].forEach((value, i) => { if (value) after[i] = label; });
    return { slice: z, after };
  }));
  setStatus(`3D box: ${answer.slices.length} slice(s) segmented`);
}

// ------------------------------------------------------------------------------------ edits
function apply(changes, record = true) {
  const step = changes.map(({ slice, after }) => ({ slice, before: labelMap(slice).slice(), after }));
  for (const { slice, after } of step) { state.maps.get(slice).set(after); state.dirty.add(slice); }
  if (record) { state.undo.push(step); state.redo = []; }
  afterEdit();
}

function afterEdit() {
  drawOverlay();
  updateButtons();
  queueSync();
}

// Undo and redo move one step between the stacks, restoring its "before" or its "after" maps.
function replay(from, to, side) {
  const step = from.pop();
  if (!step) return;
  for (const change of step) { labelMap(change.slice).set(change[side]); state.dirty.add(change.slice); }
  to.push(step);
  state.session = null;
  afterEdit();
}

const undo = () => replay(state.undo, state.redo, "before");
const redo = () => replay(state.redo, state.undo, "after");

function updateButtons() {
  $("undo").disabled = state.undo.length === 0;
  $("redo").disabled = state.redo.length === 0;
  $("range3d").hidden = tool() !== "box3d";
}

// Changed slices go to the server's label map (PUT .../mask/slices/k.png), in order.
function queueSync() {
  state.sync = state.sync.then(async () => {
    const image = state.image;
    const slices = [...state.dirty];
    state.dirty.clear();
    const [height, width] = grid();
    for (const slice of slices) {
      const png = await encodeGreyPng(width, height, labelMap(slice));
      await api(`/v1/images/${image.id}/mask/slices/${slice}.png`, { method: "PUT", headers: { "Content-Type": "image/png" }, body: png });
    }
  }).catch((error) => setStatus(error.message, true));
  return state.sync;
}

async function exportMask() {
  const format = $("format").value;
  await busy(`exporting ${format}…`, async () => {
    await queueSync();
    const names = Object.fromEntries(state.labels.map((label) => [label.value, label.name]));
    await api(`/v1/images/${state.image.id}/mask/names`, { method: "PUT", headers: { "Content-Type": "application/json" }, body: JSON.stringify(names) });
    const response = await api(`/v1/images/${state.image.id}/mask?format=${format}`);
    const name = /filename="([^"]+)"/.exec(response.headers.get("Content-Disposition") || "")?.[1] || "mask";
    const link = document.createElement("a");
    link.href = URL.createObjectURL(await response.blob());
    link.download = name;
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  });
}

async function classify() {
  const labels = $("classes").value.split(",").map((s) => s.trim()).filter(Boolean);
  const request = { labels, slice: state.image.kind === "volume" ? state.slice : null };
  const answer = await busy("classifying…", async () => (await postJson(`/v1/images/${state.image.id}/classify`, request)).json());
  if (!answer) return;
  const list = $("probabilities");
  list.replaceChildren();
  for (const [label, p] of Object.entries(answer.probabilities).sort((a, b) => b[1] - a[1])) {
    const item = document.createElement("li");
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.style.width = `${(100 * p).toFixed(1)}%`;
    item.append(`${label}: ${p.toFixed(3)}`, bar);
    list.append(item);
  }
}

// The answer comes from the server's vision-language model (by default a language model reading a
// classifier's findings): shown with its name and what it is for.
async function ask() {
  const choices = $("choices").value.split(",").map((s) => s.trim()).filter(Boolean);
  const request = { question: $("question").value, choices: choices.length ? choices : null,
    slice: state.image.kind === "volume" ? state.slice : null };
  const reply = await busy("asking… (the first question loads the model)",
    async () => (await postJson(`/v1/images/${state.image.id}/ask`, request)).json());
  if (!reply) return;
  $("answer-text").textContent = reply.answer || "(the model gave no answer)";
  $("answer-note").textContent = `${reply.model} · research use, not diagnosis`;
  $("answer").hidden = false;
}

// ------------------------------------------------------------------------------------ labels
function addLabel() {
  const value = state.labels.length ? Math.max(...state.labels.map((l) => l.value)) + 1 : 1;
  if (value > 255) return;
  state.labels.push({ value, name: `label ${value}`, colour: PALETTE[(value - 1) % PALETTE.length] });
  state.current = value;
  renderLabels();
}

function renderLabels() {
  const list = $("labels");
  list.replaceChildren();
  for (const label of state.labels) {
    const item = document.createElement("li");
    item.className = label.value === state.current ? "current" : "";
    const pick = document.createElement("input");
    pick.type = "radio";
    pick.name = "label";
    pick.checked = label.value === state.current;
    pick.addEventListener("change", () => { state.current = label.value; state.session = null; renderLabels(); });
    const swatch = document.createElement("input");
    swatch.type = "color";
    swatch.className = "swatch";
    swatch.value = label.colour;
    swatch.addEventListener("input", () => { label.colour = swatch.value; drawOverlay(); });
    const name = document.createElement("input");
    name.type = "text";
    name.value = label.name;
    name.maxLength = 64;
    name.addEventListener("input", () => { label.name = name.value; });
    item.append(pick, swatch, name);
    list.append(item);
  }
}

// ------------------------------------------------------------------------------------ wiring
async function loadModels() {
  const models = await (await api("/v1/models")).json();
  for (const model of models.segmentation) {
    const option = new Option(model.name, model.name, model.default, model.default);
    $("model").append(option);
  }
}

function wire() {
  $("file").addEventListener("change", (event) => event.target.files[0] && openFile(event.target.files[0]));
  document.addEventListener("dragover", (event) => { event.preventDefault(); document.body.classList.add("dragging"); });
  document.addEventListener("dragleave", () => document.body.classList.remove("dragging"));
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    document.body.classList.remove("dragging");
    if (event.dataTransfer.files[0]) openFile(event.dataTransfer.files[0]);
  });
  window.addEventListener("resize", fitStage);
  $("window").addEventListener("change", () => state.image && showSlice(state.slice));
  $("opacity").addEventListener("input", drawOverlay);
  $("slice").addEventListener("input", () => showSlice(Number($("slice").value)));
  $("undo").addEventListener("click", undo);
  $("redo").addEventListener("click", redo);
  $("new-object").addEventListener("click", () => { state.session = null; drawOverlay(); });
  $("export").addEventListener("click", exportMask);
  $("classify").addEventListener("click", classify);
  $("ask").addEventListener("click", ask);
  for (const box of [$("question"), $("choices")]) {
    box.addEventListener("keydown", (event) => { if (event.key === "Enter" && !$("ask").disabled) ask(); });
  }
  $("add-label").addEventListener("click", addLabel);
  for (const radio of document.querySelectorAll('input[name="tool"]')) {
    radio.addEventListener("change", () => {
      if (tool() === "box3d") { $("z0").value = Math.max(0, state.slice - 5); $("z1").value = Math.min((state.image?.slices || 1) - 1, state.slice + 5); }
      updateButtons();
    });
  }
  const overlay = $("overlay");
  overlay.addEventListener("contextmenu", (event) => event.preventDefault());
  overlay.addEventListener("wheel", (event) => {
    if (!state.image || state.image.kind !== "volume") return;
    event.preventDefault();
    const next = Math.min(Math.max(state.slice + Math.sign(event.deltaY), 0), state.image.slices - 1);
    if (next !== state.slice) showSlice(next);
  }, { passive: false });
  overlay.addEventListener("mousedown", (event) => {
    if (!state.image || document.body.dataset.busy === "1") return;
    const xy = imageXY(event);
    if (tool() === "box" || tool() === "box3d") {
      state.drag = { start: xy, now: null };
      return;
    }
    const session = sessionFor(state.slice);
    session.points.push([...xy, tool() === "positive" && event.button === 0 ? 1 : 0]);
    segmentSession();
  });
  overlay.addEventListener("mousemove", (event) => {
    if (!state.drag) return;
    state.drag.now = imageXY(event);
    drawOverlay();
  });
  window.addEventListener("mouseup", (event) => {
    if (!state.drag) return;
    const [x0, y0] = state.drag.start;
    const [x1, y1] = state.drag.now ? imageXY(event) : state.drag.start;
    state.drag = null;
    const box = [Math.min(x0, x1), Math.min(y0, y1), Math.max(x0, x1), Math.max(y0, y1)];
    if (box[2] - box[0] < 2 || box[3] - box[1] < 2) { drawOverlay(); return; }
    if (tool() === "box3d") { segmentBox3d(box); return; }
    const session = newSession();
    session.box = box;
    segmentSession();
  });
  document.addEventListener("keydown", (event) => {
    if (event.target.tagName === "INPUT" && event.target.type === "text") return;
    const key = event.key.toLowerCase();
    if ((event.ctrlKey || event.metaKey) && key === "z") { event.preventDefault(); event.shiftKey ? redo() : undo(); }
    else if ((event.ctrlKey || event.metaKey) && key === "y") { event.preventDefault(); redo(); }
    else if (key === "escape") { state.session = null; drawOverlay(); }
  });
}

async function start() {
  const fromUrl = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromUrl) { sessionStorage.setItem("medfm-token", fromUrl); history.replaceState(null, "", location.pathname); }
  state.token = sessionStorage.getItem("medfm-token");
  wire();
  addLabel();
  try {
    await loadModels();
  } catch (error) {
    const token = error.message.includes("token") && prompt("This server needs its access token:");
    if (!token) { setStatus(error.message, true); return; }
    sessionStorage.setItem("medfm-token", token);
    state.token = token;
    await loadModels().catch((again) => setStatus(again.message, true));
  }
}

start();
