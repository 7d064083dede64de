// segany serve: the page. Talks to the JSON API under /api/ (see /docs).
// Conventions: coordinates are pixels of the original image (x right, y down), boxes are
// [x0, y0, x1, y1], point label 1 = foreground, 0 = background; masks are COCO RLE.
// The canvas has the image's own size (CSS scales it), so mask pixels map 1:1.
// State for tests and tools is mirrored on the canvas: data-mask-count (masks drawn),
// data-candidates, data-selected, data-objects, data-image-id; body[data-busy].

const $ = (id) => document.getElementById(id);
const canvas = $("canvas");
const ctx = canvas.getContext("2d");

const CANDIDATE_RGB = [30, 144, 255];
const FILL_ALPHA = 100; // of 255: masks tint the image, which stays visible
const DRAG_PIXELS = 5; // screen pixels a press must move to become a box

const state = {
  images: [],
  index: -1,
  picture: null, // HTMLImageElement of the current image
  objects: [],
  prompts: { points: [], labels: [], box: null },
  history: [], // earlier prompts, for undo
  candidates: [],
  selected: -1,
  mode: 1, // label of a left click
  pending: 0,
  predictSeq: 0,
  objectLayer: null,
  candidateLayer: null,
  drag: null,
};

// ---------------------------------------------------------------------------- API

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

async function api(method, path, body, headers = {}) {
  const options = { method, headers: { ...headers } };
  if (body instanceof FormData) {
    options.body = body;
  } else if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  busy(+1);
  try {
    const response = await fetch(path, options);
    if (response.status === 204) return null;
    const payload = await response.json().catch(() => ({}));
    if (!response.ok) {
      const detail = typeof payload.detail === "string" ? payload.detail : response.statusText;
      throw new ApiError(response.status, detail);
    }
    return { data: payload, etag: response.headers.get("ETag") };
  } finally {
    busy(-1);
  }
}

function busy(change) {
  state.pending += change;
  document.body.dataset.busy = state.pending > 0 ? "1" : "0";
}

function say(message, isError = false) {
  const status = $("status");
  status.textContent = message;
  status.classList.toggle("error", isError);
}

function fail(error) {
  if (error instanceof ApiError && error.status === 401) {
    say("This server needs a token: open the link segany serve printed (…/?token=…).", true);
  } else {
    say(error.message || String(error), true);
  }
}

// ---------------------------------------------------------------------------- masks

/** Run lengths of a compressed COCO RLE string (pycocotools' rleFrString). */
function cocoCounts(text) {
  const counts = [];
  let p = 0;
  while (p < text.length) {
    let value = 0;
    let shift = 0;
    let more = true;
    while (more) {
      const c = text.charCodeAt(p++) - 48;
      value += (c & 0x1f) * 2 ** shift; // arithmetic, not bit ops: values can exceed 32 bits
      shift += 5;
      more = (c & 0x20) !== 0;
      if (!more && (c & 0x10)) value -= 2 ** shift;
    }
    if (counts.length > 2) value += counts[counts.length - 2];
    counts.push(value);
  }
  return counts;
}

/** Calls paint(x, y) for every pixel inside a COCO RLE mask (column-major runs). */
function forEachPixel(mask, paint) {
  const [h] = mask.size;
  const counts = typeof mask.counts === "string" ? cocoCounts(mask.counts) : mask.counts;
  let index = 0;
  counts.forEach((run, i) => {
    if (i % 2 === 1) {
      for (let k = index; k < index + run; k++) paint(Math.floor(k / h), k % h);
    }
    index += run;
  });
}

function colour(id) {
  // Golden-ratio hues: neighbouring ids get distinct colours.
  const hue = (id * 0.618033988749895) % 1;
  const f = (n) => {
    const k = (n + hue * 12) % 12;
    return Math.round(255 * (0.55 - 0.45 * Math.max(-1, Math.min(k - 3, 9 - k, 1))));
  };
  return [f(0), f(8), f(4)];
}

/** An offscreen canvas with masks filled in their colours and outlined (later on top). */
function maskLayer(masks) {
  const { width, height } = canvas;
  const layer = document.createElement("canvas");
  layer.width = width;
  layer.height = height;
  const pixels = new ImageData(width, height);
  const owner = new Int32Array(width * height); // 1 + index of the mask painted last
  masks.forEach(({ mask, rgb }, index) => {
    const bounds = [width, height, -1, -1];
    forEachPixel(mask, (x, y) => {
      owner[y * width + x] = index + 1;
      setPixel(pixels.data, y * width + x, rgb, FILL_ALPHA);
      bounds[0] = Math.min(bounds[0], x);
      bounds[1] = Math.min(bounds[1], y);
      bounds[2] = Math.max(bounds[2], x);
      bounds[3] = Math.max(bounds[3], y);
    });
    outline(pixels, owner, index + 1, bounds, rgb);
  });
  layer.getContext("2d").putImageData(pixels, 0, 0);
  return layer;
}

function setPixel(data, index, rgb, alpha) {
  const offset = 4 * index;
  data[offset] = rgb[0];
  data[offset + 1] = rgb[1];
  data[offset + 2] = rgb[2];
  data[offset + 3] = alpha;
}

/** Opaque border pixels of mask ``id`` (searched only inside its bounds). */
function outline(pixels, owner, id, [x0, y0, x1, y1], rgb) {
  const { width, height } = pixels;
  const inside = (x, y) => x >= 0 && y >= 0 && x < width && y < height && owner[y * width + x] === id;
  for (let y = y0; y <= y1; y++) {
    for (let x = x0; x <= x1; x++) {
      if (!inside(x, y)) continue;
      if (!inside(x - 1, y) || !inside(x + 1, y) || !inside(x, y - 1) || !inside(x, y + 1)) {
        setPixel(pixels.data, y * width + x, rgb, 255);
      }
    }
  }
}

// ---------------------------------------------------------------------------- drawing

function rebuildObjectLayer() {
  state.objectLayer = maskLayer(
    state.objects.map((o) => ({ mask: o.mask, rgb: colour(o.id) })),
  );
}

function rebuildCandidateLayer() {
  const candidate = state.candidates[state.selected];
  state.candidateLayer = candidate
    ? maskLayer([{ mask: candidate.mask, rgb: CANDIDATE_RGB }])
    : null;
}

function render() {
  if (!state.picture) return;
  ctx.drawImage(state.picture, 0, 0);
  if (state.objectLayer) ctx.drawImage(state.objectLayer, 0, 0);
  if (state.candidateLayer) ctx.drawImage(state.candidateLayer, 0, 0);
  drawPrompts();
  const drawn = state.objects.length + (state.candidateLayer ? 1 : 0);
  Object.assign(canvas.dataset, {
    maskCount: String(drawn),
    candidates: String(state.candidates.length),
    selected: String(state.selected),
    objects: String(state.objects.length),
  });
}

function drawPrompts() {
  const unit = Math.max(2, Math.min(canvas.width, canvas.height) / 150);
  const { points, labels, box } = state.prompts;
  const boxes = state.drag && state.drag.box ? [state.drag.box] : box ? [box] : [];
  ctx.lineWidth = unit;
  ctx.strokeStyle = "#00ff66";
  for (const [x0, y0, x1, y1] of boxes) ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
  points.forEach(([x, y], i) => {
    ctx.beginPath();
    ctx.arc(x, y, 2.2 * unit, 0, 2 * Math.PI);
    ctx.fillStyle = labels[i] === 1 ? "#00c853" : "#ff1744";
    ctx.fill();
    ctx.lineWidth = unit * 0.8;
    ctx.strokeStyle = "#fff";
    ctx.stroke();
  });
}

function fitCanvas() {
  const stage = $("stage");
  const scale = Math.min(
    (stage.clientWidth - 16) / canvas.width,
    (stage.clientHeight - 16) / canvas.height,
  );
  canvas.style.width = `${Math.max(1, canvas.width * scale)}px`;
  canvas.style.height = `${Math.max(1, canvas.height * scale)}px`;
}

// ---------------------------------------------------------------------------- images

const current = () => state.images[state.index];

async function loadImages() {
  const { data } = await api("GET", "/api/images");
  state.images = data;
  renderImageList();
}

function renderImageList() {
  const list = $("images");
  list.replaceChildren(
    ...state.images.map((image, i) => {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.className = i === state.index ? "on" : "";
      button.dataset.imageId = image.id;
      button.title = image.name;
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = image.name;
      const badge = document.createElement("span");
      badge.className = "badge";
      badge.textContent = image.objects ? String(image.objects) : "";
      button.append(name, badge);
      button.onclick = () => openImage(i).catch(fail);
      item.append(button);
      return item;
    }),
  );
  const image = current();
  $("image-name").textContent = image
    ? `${image.name} (${state.index + 1}/${state.images.length})`
    : "no image";
}

function loadPicture(url) {
  return new Promise((resolve, reject) => {
    const picture = new Image();
    picture.onload = () => resolve(picture);
    picture.onerror = () => reject(new Error("the image could not be loaded"));
    picture.src = url;
  });
}

async function openImage(index) {
  if (index < 0 || index >= state.images.length) return;
  state.index = index;
  const image = current();
  renderImageList();
  resetPrompts();
  say(`Loading ${image.name}…`);
  busy(+1);
  try {
    state.picture = await loadPicture(`/api/images/${image.id}/pixels`);
  } finally {
    busy(-1);
  }
  canvas.width = state.picture.naturalWidth;
  canvas.height = state.picture.naturalHeight;
  canvas.dataset.imageId = String(image.id);
  canvas.classList.add("ready");
  $("empty").hidden = true;
  fitCanvas();
  await loadObjects();
  say(`Computing the embedding of ${image.name}…`);
  const { data } = await api("POST", `/api/images/${image.id}/embedding`);
  if (current() === image) {
    say(`${image.name}: ready (embedding from ${data.embedding}). Click the object.`);
  }
}

async function upload(files) {
  let last = null;
  for (const file of files) {
    const form = new FormData();
    form.append("file", file);
    try {
      last = (await api("POST", "/api/images", form)).data;
    } catch (error) {
      fail(new Error(`${file.name}: ${error.message}`));
    }
  }
  await loadImages();
  if (last) await openImage(state.images.findIndex((image) => image.id === last.id));
}

// ---------------------------------------------------------------------------- objects

async function loadObjects() {
  const image = current();
  const { data } = await api("GET", `/api/images/${image.id}/objects`);
  if (current() !== image) return;
  state.objects = data;
  objectsChanged();
}

function objectsChanged() {
  rebuildObjectLayer();
  renderObjectList();
  render();
  const image = current();
  if (image) {
    image.objects = state.objects.filter((o) => o.source !== "proposal").length;
    renderImageList();
  }
}

function renderObjectList() {
  const labels = new Set();
  $("objects").replaceChildren(
    ...state.objects.map((object) => {
      if (object.label) labels.add(object.label);
      return objectRow(object);
    }),
  );
  $("object-count").textContent = state.objects.length ? `(${state.objects.length})` : "";
  $("labels").replaceChildren(
    ...[...labels].sort().map((label) => Object.assign(document.createElement("option"), { value: label })),
  );
}

function objectRow(object) {
  const item = document.createElement("li");
  item.className = object.source;
  item.dataset.objectId = object.id;
  const swatch = document.createElement("span");
  swatch.className = "swatch";
  swatch.style.background = `rgb(${colour(object.id).join(",")})`;
  const label = document.createElement("input");
  label.value = object.label;
  label.placeholder = "label";
  label.setAttribute("aria-label", `label of object ${object.id}`);
  label.onchange = () => changeObject(object, { label: label.value }).catch(fail);
  const source = document.createElement("span");
  source.className = "source";
  source.textContent = object.source;
  const remove = button("×", `Delete object ${object.id}`, () => deleteObject(object).catch(fail));
  item.append(swatch, label, source);
  if (object.source === "proposal") {
    item.append(button("✓", "Keep this proposal", () => changeObject(object, { source: "auto" }).catch(fail)));
  }
  item.append(remove);
  return item;
}

function button(text, title, onclick) {
  const element = document.createElement("button");
  element.textContent = text;
  element.title = title;
  element.onclick = onclick;
  return element;
}

/** PATCH with the version we saw; on a conflict (412) reload and tell the user. */
async function changeObject(object, changes) {
  try {
    const { data } = await api("PATCH", `/api/objects/${object.id}`, changes, {
      "If-Match": `"${object.version}"`,
    });
    state.objects = state.objects.map((o) => (o.id === data.id ? data : o));
    objectsChanged();
    say(`Object ${data.id} saved.`);
  } catch (error) {
    await recoverFromConflict(error);
  }
}

async function deleteObject(object) {
  try {
    await api("DELETE", `/api/objects/${object.id}`, undefined, { "If-Match": `"${object.version}"` });
    state.objects = state.objects.filter((o) => o.id !== object.id);
    objectsChanged();
    say(`Object ${object.id} deleted.`);
  } catch (error) {
    await recoverFromConflict(error);
  }
}

async function recoverFromConflict(error) {
  if (!(error instanceof ApiError) || (error.status !== 412 && error.status !== 404)) throw error;
  await loadObjects();
  say(`${error.message} (reloaded).`, true);
}

async function saveObject() {
  const candidate = state.candidates[state.selected];
  if (!candidate) {
    say("Click the object first, then save the mask.", true);
    return;
  }
  const image = current();
  const { data } = await api("POST", `/api/images/${image.id}/objects`, {
    mask: candidate.mask,
    label: $("label").value,
    score: candidate.score,
    source: "manual",
    prompts: state.prompts,
  });
  state.objects = [...state.objects, data];
  resetPrompts();
  objectsChanged();
  say(`Saved object ${data.id}${data.label ? ` (${data.label})` : ""}.`);
}

async function segmentEverything() {
  const image = current();
  if (!image) return;
  say("Segmenting everything… (this takes a while on a CPU)");
  const points = Number($("points-per-side").value) || 32;
  const { data } = await api("POST", `/api/images/${image.id}/everything`, { points_per_side: points });
  if (current() !== image) return;
  await loadObjects();
  say(`${data.length} proposals: keep (✓) or delete (×) them, or use Keep all / Discard all.`);
}

async function proposals(method, path, verb) {
  const image = current();
  if (!image) return;
  const { data } = await api(method, `/api/images/${image.id}/proposals${path}`);
  await loadObjects();
  say(`${data.count} proposals ${verb}.`);
}

// ---------------------------------------------------------------------------- prompts

function resetPrompts() {
  state.prompts = { points: [], labels: [], box: null };
  state.history = [];
  setCandidates([], -1);
}

function changePrompts(change) {
  const { points, labels, box } = state.prompts;
  state.history.push({ points: [...points], labels: [...labels], box });
  change(state.prompts);
  predict().catch(fail);
}

function undo() {
  const previous = state.history.pop();
  if (!previous) return;
  state.prompts = previous;
  predict().catch(fail);
}

function clearPrompts() {
  const { points, box } = state.prompts;
  if (!points.length && !box) return;
  changePrompts((prompts) => Object.assign(prompts, { points: [], labels: [], box: null }));
}

async function predict() {
  const image = current();
  const seq = ++state.predictSeq;
  const { points, box } = state.prompts;
  if (!image || (!points.length && !box)) {
    setCandidates([], -1);
    return;
  }
  render(); // show the new prompt at once
  const body = { ...state.prompts, zoom: $("zoom").checked };
  const { data } = await api("POST", `/api/images/${image.id}/predict`, body);
  if (seq !== state.predictSeq || current() !== image) return; // a newer prompt won
  setCandidates(data.candidates, data.best);
  say(`Mask in ${data.decoder_ms.toFixed(0)} ms. Enter saves it; 1-3 pick another candidate.`);
}

function setCandidates(candidates, selected) {
  state.candidates = candidates;
  selectCandidate(selected);
  const row = $("candidates");
  row.replaceChildren(
    ...candidates.map((candidate, i) => {
      const choice = button(`${i + 1} · ${candidate.score.toFixed(2)}`, `Candidate ${i + 1} (key ${i + 1})`, () => selectCandidate(i));
      choice.dataset.index = i;
      return choice;
    }),
  );
  markSelected();
}

function selectCandidate(index) {
  state.selected = index < state.candidates.length ? index : -1;
  rebuildCandidateLayer();
  markSelected();
  render();
}

function markSelected() {
  for (const choice of $("candidates").children) {
    choice.classList.toggle("on", Number(choice.dataset.index) === state.selected);
  }
}

function imagePoint(event) {
  const rect = canvas.getBoundingClientRect();
  const x = ((event.clientX - rect.left) * canvas.width) / rect.width;
  const y = ((event.clientY - rect.top) * canvas.height) / rect.height;
  return [Math.min(Math.max(x, 0), canvas.width), Math.min(Math.max(y, 0), canvas.height)];
}

function onPointerDown(event) {
  if (!state.picture || event.button > 2) return;
  canvas.setPointerCapture(event.pointerId);
  state.drag = { start: imagePoint(event), screen: [event.clientX, event.clientY], button: event.button, box: null };
}

function onPointerMove(event) {
  const drag = state.drag;
  if (!drag) return;
  const moved = Math.hypot(event.clientX - drag.screen[0], event.clientY - drag.screen[1]);
  if (moved < DRAG_PIXELS && !drag.box) return;
  const [x, y] = imagePoint(event);
  const [x0, y0] = drag.start;
  drag.box = [Math.min(x0, x), Math.min(y0, y), Math.max(x0, x), Math.max(y0, y)];
  render();
}

function onPointerUp(event) {
  const drag = state.drag;
  state.drag = null;
  if (!drag) return;
  if (drag.box) {
    changePrompts((prompts) => { prompts.box = drag.box; });
    return;
  }
  const label = drag.button === 2 || event.shiftKey ? 0 : state.mode;
  changePrompts((prompts) => {
    prompts.points.push(drag.start);
    prompts.labels.push(label);
  });
}

function setMode(label) {
  state.mode = label;
  for (const [id, value] of [["mode-fg", 1], ["mode-bg", 0]]) {
    $(id).classList.toggle("on", value === label);
    $(id).setAttribute("aria-checked", String(value === label));
  }
}

// ---------------------------------------------------------------------------- wiring

function onKey(event) {
  const typing = event.target instanceof HTMLInputElement;
  if (event.key === "Enter" && (!typing || event.target.id === "label")) {
    event.preventDefault();
    saveObject().catch(fail);
    return;
  }
  if (typing) return;
  const actions = {
    z: () => (event.ctrlKey || event.metaKey) && undo(),
    Escape: clearPrompts,
    f: () => setMode(1),
    b: () => setMode(0),
    1: () => selectCandidate(0),
    2: () => selectCandidate(1),
    3: () => selectCandidate(2),
    ArrowRight: () => openImage(state.index + 1).catch(fail),
    ArrowLeft: () => openImage(state.index - 1).catch(fail),
  };
  const action = actions[event.key];
  if (action) {
    event.preventDefault();
    action();
  }
}

function wire() {
  canvas.addEventListener("pointerdown", onPointerDown);
  canvas.addEventListener("pointermove", onPointerMove);
  canvas.addEventListener("pointerup", onPointerUp);
  canvas.addEventListener("contextmenu", (event) => event.preventDefault());
  window.addEventListener("keydown", onKey);
  window.addEventListener("resize", fitCanvas);
  $("mode-fg").onclick = () => setMode(1);
  $("mode-bg").onclick = () => setMode(0);
  $("undo").onclick = undo;
  $("clear").onclick = clearPrompts;
  $("save").onclick = () => saveObject().catch(fail);
  $("zoom").onchange = () => predict().catch(fail);
  $("everything").onclick = () => segmentEverything().catch(fail);
  $("keep-all").onclick = () => proposals("POST", "/keep", "kept").catch(fail);
  $("discard-all").onclick = () => proposals("DELETE", "", "deleted").catch(fail);
  $("prev").onclick = () => openImage(state.index - 1).catch(fail);
  $("next").onclick = () => openImage(state.index + 1).catch(fail);
  $("upload").onchange = (event) => upload([...event.target.files]).catch(fail);
}

async function start() {
  wire();
  try {
    const { data } = await api("GET", "/api/info");
    $("model").textContent = `model ${data.model} · segany ${data.version}`;
    $("points-per-side").max = data.max_points_per_side; // the server's limit, one source
    $("zoom-choice").hidden = !data.zoom;
    await loadImages();
    if (state.images.length) await openImage(0);
    else say("No images yet: upload some.");
  } catch (error) {
    fail(error);
  }
}

start();
