// The studio page of `sd35m-mlx serve`: plain JavaScript on the server's public endpoints (README, "The studio").
// It keeps no state the server does not have, except this tab's API key (sessionStorage) and the session's
// results; everything else (models, limits, LoRAs, history) is asked for.
"use strict";
const $ = (id) => document.getElementById(id);
const KEY = "sd35m-mlx-key";
const HISTORY_PAGE = 12;
const state = {
  busy: false, controller: null, poll: null, config: null, lastSeed: null, caret: null,
  init: null, initSize: null, mode: null, eraser: false, control: null,
  history: { offset: 0, total: 0, on: false, timer: null, blobs: [] },
};

// ---- talking to the server ----

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = sessionStorage.getItem(KEY);
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(path, options) {
  options = Object.assign({}, options || {});
  options.headers = headers(options.headers);
  const r = await fetch(path, options);
  if (r.status === 401) {
    $("key-box").hidden = false;
    throw new Error("this server needs an API key: enter it below");
  }
  let body = null;
  try { body = await r.json(); } catch (e) { body = null; }
  if (!r.ok) {
    const msg = (body && (body.detail || (body.error && body.error.message))) || ("HTTP " + r.status);
    const error = new Error(typeof msg === "string" ? msg : JSON.stringify(msg));
    error.status = r.status;
    throw error;
  }
  return body;
}

function post(path, body, signal) {
  return api(path, { method: "POST", body: JSON.stringify(body), signal, headers: { "Content-Type": "application/json" } });
}

function say(text, isError) {
  $("status").textContent = text;
  $("status").classList.toggle("error", !!isError);
}

function fillSelect(select, items, value, label) {
  select.replaceChildren(...items.map((item) => {
    const o = document.createElement("option");
    o.value = value(item);
    o.textContent = label(item);
    return o;
  }));
}

// ---- the form: settings in, settings out ----

function settings() {
  return {
    prompt: $("prompt").value,
    negative_prompt: $("negative").value,
    width: parseInt($("width").value, 10),
    height: parseInt($("height").value, 10),
    steps: parseInt($("steps").value, 10),
    cfg_scale: parseFloat($("cfg").value),
    seed: parseInt($("seed").value, 10),
    sampler_name: $("sampler").value,
    scheduler: $("scheduler").value,
    batch_size: parseInt($("count").value, 10) || 1,
    n_iter: 1,
    save_images: true,
  };
}

function useSettings(s) {
  const set = (id, v) => { if (v !== undefined && v !== null && v !== "" && !Number.isNaN(v)) $(id).value = v; };
  $("prompt").value = s.prompt || "";
  $("negative").value = s.negative_prompt || "";
  set("width", s.width); set("height", s.height); set("steps", s.steps); set("cfg", s.cfg_scale);
  set("seed", s.seed); set("sampler", s.sampler_name); set("scheduler", s.scheduler);
  $("aspect").value = "";
  $("prompt").focus();
}

// A1111's infotext items (as /sdapi/v1/png-info parses them) -> the form's settings.
function fromParameters(item) {
  const p = item.parameters || {};
  const num = (v) => (v === undefined ? undefined : Number(v));
  const scheduler = p["Schedule type"] && [...$("scheduler").options].find((o) => o.textContent === p["Schedule type"]);
  return {
    prompt: item.prompt !== undefined ? item.prompt : p.Prompt,
    negative_prompt: item.negative_prompt !== undefined ? item.negative_prompt : p["Negative prompt"],
    width: num(p["Size-1"]) || item.width, height: num(p["Size-2"]) || item.height,
    steps: num(p.Steps), cfg_scale: num(p["CFG scale"]), seed: num(p.Seed),
    sampler_name: p.Sampler, scheduler: scheduler ? scheduler.value : undefined,
  };
}

// The resident model's limits and defaults (GET /studio/config): Width/Height max, Steps, Guidance, Count.
async function loadConfig(applyDefaults) {
  let config;
  try { config = await api("/studio/config"); } catch (e) { if (e.status === 404) return; throw e; }
  state.config = config;
  const m = config.model;
  for (const [id, max] of [["width", m.max_width], ["height", m.max_height]]) {
    $(id).max = max; $(id).step = m.multiple; $(id).min = m.multiple;
  }
  $("steps").max = m.max_steps; $("count").max = m.max_count;
  for (const id of ["pad-left", "pad-top", "pad-right", "pad-bottom"]) $(id).step = m.multiple;
  if (applyDefaults) {
    $("width").value = m.default_width; $("height").value = m.default_height;
    $("steps").value = m.default_steps; $("cfg").value = m.default_guidance;
  }
  state.history.on = !!config.output_dir;
  $("history-box").hidden = !state.history.on;
  if (state.history.on) loadHistory();
}

function applyAspect() {
  const value = $("aspect").value;
  const m = state.config && state.config.model;
  if (!value || !m) return;
  const [a, b] = value.split(":").map(Number);
  const area = m.default_width * m.default_height;  // the default's pixel count, in that shape, within the limits
  const w = Math.sqrt((area * a) / b), h = Math.sqrt((area * b) / a);
  const k = Math.min(1, m.max_width / w, m.max_height / h);
  const snap = (v, max) => Math.min(max, Math.max(m.multiple, Math.round((v * k) / m.multiple) * m.multiple));
  $("width").value = snap(w, m.max_width);
  $("height").value = snap(h, m.max_height);
}

async function switchModel() {
  const title = $("model").value;
  $("generate").disabled = true;
  $("model").disabled = true;
  say("Loading " + title + "...");
  try {
    await post("/sdapi/v1/options", { sd_model_checkpoint: title });
    await loadConfig(true);
    say(title + " is ready.");
  } catch (e) {
    say(e.message, true);
  } finally {
    $("model").disabled = false;
    $("generate").disabled = state.busy;
  }
}

// ---- LoRAs: a searchable list; a click inserts the tag with weight 1, selected so typing replaces it ----

function triggerWords(meta) {
  meta = meta || {};
  const words = [];
  const phrase = meta["modelspec.trigger_phrase"] || meta["trigger_phrase"];
  if (typeof phrase === "string") words.push(...phrase.split(",").map((w) => w.trim()).filter(Boolean));
  let freq = meta.ss_tag_frequency;
  if (typeof freq === "string") { try { freq = JSON.parse(freq); } catch (e) { freq = null; } }
  if (freq && typeof freq === "object") {
    const counts = {};
    for (const tags of Object.values(freq)) for (const [tag, n] of Object.entries(tags || {})) counts[tag] = (counts[tag] || 0) + n;
    words.push(...Object.keys(counts).sort((x, y) => counts[y] - counts[x]).slice(0, 5));
  }
  return [...new Set(words)];
}

// At the caret the prompt had when it lost focus to the list (the end if it never had one).
function insertIntoPrompt(text, select) {
  const p = $("prompt");
  const start = Math.min(state.caret === null ? p.value.length : state.caret, p.value.length);
  const before = p.value.slice(0, start);
  const lead = before && !/\s$/.test(before) ? " " : "";
  p.value = before + lead + text + p.value.slice(start);
  p.focus();
  const at = before.length + lead.length;
  if (select) p.setSelectionRange(at + select[0], at + select[1]);
  else p.setSelectionRange(at + text.length, at + text.length);
  state.caret = at + text.length;
}

async function loadLoras() {
  let loras;
  try { loras = await api("/sdapi/v1/loras"); } catch (e) { $("lora-note").textContent = e.message; return; }
  const list = $("lora-list");
  list.replaceChildren();
  for (const lora of loras) {
    const li = document.createElement("li");
    const words = triggerWords(lora.metadata);
    li.dataset.search = [lora.name, lora.alias, ...words].join(" ").toLowerCase();
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = lora.name;
    b.title = "Insert <lora:" + lora.name + ":1>";
    const tag = "<lora:" + lora.name + ":1>";
    b.addEventListener("click", () => insertIntoPrompt(tag, [tag.length - 2, tag.length - 1]));
    li.append(b);
    for (const word of words) {
      const w = document.createElement("button");
      w.type = "button"; w.className = "trigger"; w.textContent = word; w.title = "Insert the trigger word";
      w.addEventListener("click", () => insertIntoPrompt(word));
      li.append(w);
    }
    list.append(li);
  }
  $("lora-count").textContent = "(" + loras.length + ")";
  $("lora-note").textContent = loras.length ? "" : "No LoRAs: start serve with --lora-dir.";
}

function filterLoras() {
  const q = $("lora-search").value.trim().toLowerCase();
  for (const li of $("lora-list").children) li.hidden = !!q && !li.dataset.search.includes(q);
}

// ---- the input image, its mask (painted on a canvas) and outpaint margins ----

function readFile(file) {
  return new Promise((resolve, reject) => {
    if (!file || !file.type.startsWith("image/")) { reject(new Error("That is not an image.")); return; }
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const im = new Image();
    im.onload = () => resolve(im);
    im.onerror = () => reject(new Error("That image could not be read."));
    im.src = src;
  });
}

async function setInit(file) {
  try {
    const url = await readFile(file);
    const im = await loadImage(url);
    state.init = url;
    state.initSize = [im.naturalWidth, im.naturalHeight];
    $("init-img").src = url;
    const canvas = $("mask-canvas");
    canvas.width = im.naturalWidth; canvas.height = im.naturalHeight;  // also clears the mask
    for (const id of ["pad-left", "pad-top", "pad-right", "pad-bottom"]) $(id).value = 0;
    $("init-controls").classList.add("on");
    $("image-box").open = true;
    sizeFromImage();
    layoutFrame();
    say("img2img: from " + file.name);
  } catch (e) { say(e.message, true); }
}

function clearInit() {
  state.init = null; state.initSize = null;
  setMode(null);
  $("init-controls").classList.remove("on");
  $("file").value = ""; $("mask-file").value = "";
  say("");
}

// Generate at the image's size plus the outpaint margins, snapped to the model's multiple.
function sizeFromImage() {
  if (!state.initSize) return;
  const multiple = (state.config && state.config.model.multiple) || 16;
  const [w, h] = state.initSize;
  const [l, t, r, b] = pads();
  $("width").value = Math.max(multiple, Math.round((w + l + r) / multiple) * multiple);
  $("height").value = Math.max(multiple, Math.round((h + t + b) / multiple) * multiple);
}

// The outpaint margins, in image pixels; they apply in Outpaint mode only.
function pads() {
  if (state.mode !== "outpaint") return [0, 0, 0, 0];
  return ["pad-left", "pad-top", "pad-right", "pad-bottom"].map((id) => Math.max(0, parseInt($(id).value, 10) || 0));
}

// Mask or Outpaint (pressing the active one again leaves it); the size follows the margins in and out of Outpaint.
function setMode(mode) {
  const before = state.mode;
  state.mode = state.mode === mode ? null : mode;
  $("mask-mode").setAttribute("aria-pressed", String(state.mode === "mask"));
  $("outpaint-mode").setAttribute("aria-pressed", String(state.mode === "outpaint"));
  $("mask-tools").hidden = state.mode !== "mask";
  $("outpaint-tools").hidden = state.mode !== "outpaint";
  $("frame").classList.toggle("brush", state.mode === "mask");
  $("frame").classList.toggle("outpaint", state.mode === "outpaint");
  $("strength-row").hidden = state.mode === "outpaint";  // margins are painted at strength 1
  if (before === "outpaint" || state.mode === "outpaint") sizeFromImage();
  layoutFrame();
}

// Display scale: the image (and its margins) fit the form's width and 360 px of height.
function layoutFrame() {
  if (!state.initSize) return;
  const [w, h] = state.initSize;
  const [l, t, r, b] = pads();
  const room = $("init-controls").clientWidth || 360;
  const scale = Math.min(room / (w + l + r), 360 / (h + t + b), 4);
  state.scale = scale;
  const img = $("init-img"), canvas = $("mask-canvas"), frame = $("frame");
  img.style.width = canvas.style.width = w * scale + "px";
  img.style.height = canvas.style.height = h * scale + "px";
  frame.style.padding = [t, r, b, l].map((v) => v * scale + "px").join(" ");
  canvas.style.left = l * scale + "px"; canvas.style.top = t * scale + "px";
}

// The brush: Pointer Events, so mouse, touch and pen paint alike (pen pressure scales the brush).
function brushAt(e) {
  const canvas = $("mask-canvas");
  const rect = canvas.getBoundingClientRect();
  const k = canvas.width / rect.width;
  const pressure = e.pointerType === "pen" && e.pressure > 0 ? e.pressure * 2 : 1;
  return { x: (e.clientX - rect.left) * k, y: (e.clientY - rect.top) * k, size: $("brush").value * k * pressure };
}

function stroke(from, to) {
  const ctx = $("mask-canvas").getContext("2d");
  ctx.globalCompositeOperation = state.eraser ? "destination-out" : "source-over";
  ctx.strokeStyle = ctx.fillStyle = "rgb(" + getComputedStyle(document.body).getPropertyValue("--mask") + ")";
  ctx.lineWidth = to.size; ctx.lineCap = ctx.lineJoin = "round";
  ctx.beginPath();
  if (from === to) { ctx.arc(to.x, to.y, to.size / 2, 0, 2 * Math.PI); ctx.fill(); return; }  // a dab
  ctx.moveTo(from.x, from.y); ctx.lineTo(to.x, to.y); ctx.stroke();
}

function paintEvents() {
  const canvas = $("mask-canvas");
  let last = null;
  canvas.addEventListener("pointerdown", (e) => {
    if (state.mode !== "mask") return;
    e.preventDefault();  // no text selection while painting
    try { canvas.setPointerCapture(e.pointerId); } catch (err) { /* a pointer the browser no longer tracks */ }
    last = brushAt(e);
    stroke(last, last);
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!last) return;
    const events = e.getCoalescedEvents ? e.getCoalescedEvents() : [];  // the pen's or mouse's every sample
    for (const ev of events.length ? events : [e]) { const p = brushAt(ev); stroke(last, p); last = p; }
  });
  for (const type of ["pointerup", "pointercancel"]) canvas.addEventListener(type, () => { last = null; });
}

// Mask pixels: painted alpha is the mask (white = repaint); a mask file's luminance becomes that alpha.
function mapMask(f) {
  const canvas = $("mask-canvas"), ctx = canvas.getContext("2d");
  const data = ctx.getImageData(0, 0, canvas.width, canvas.height);
  const tint = getComputedStyle(document.body).getPropertyValue("--mask").split(",").map(Number);
  for (let i = 0; i < data.data.length; i += 4) {
    const a = f(data.data, i);
    data.data.set([tint[0], tint[1], tint[2], a], i);
  }
  ctx.putImageData(data, 0, 0);
}

async function setMaskFile(file) {
  try {
    const im = await loadImage(await readFile(file));
    const canvas = $("mask-canvas"), ctx = canvas.getContext("2d");
    ctx.globalCompositeOperation = "copy";
    ctx.drawImage(im, 0, 0, canvas.width, canvas.height);
    mapMask((d, i) => Math.round(0.299 * d[i] + 0.587 * d[i + 1] + 0.114 * d[i + 2]));
    if (state.mode !== "mask") setMode("mask");
    say("inpaint: mask " + file.name);
  } catch (e) { say(e.message, true); }
}

function maskPng() {
  const canvas = $("mask-canvas");
  if (!canvas.width) return null;
  const alpha = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let painted = false;
  for (let i = 3; i < alpha.length && !painted; i += 4) painted = alpha[i] > 0;
  if (!painted) return null;
  const out = document.createElement("canvas");
  out.width = canvas.width; out.height = canvas.height;
  const ctx = out.getContext("2d");
  ctx.drawImage(canvas, 0, 0);
  ctx.globalCompositeOperation = "source-in";
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, out.width, out.height);
  ctx.globalCompositeOperation = "destination-over";
  ctx.fillStyle = "#000"; ctx.fillRect(0, 0, out.width, out.height);
  return out.toDataURL("image/png");
}

// Outpaint: drag an edge of the frame outwards (the nearest edge to where the drag starts).
function outpaintEvents() {
  const frame = $("frame");
  let drag = null;
  frame.addEventListener("pointerdown", (e) => {
    if (state.mode !== "outpaint") return;
    e.preventDefault();  // no text selection or image drag: this drag moves an edge
    const r = frame.getBoundingClientRect();
    const dist = { left: e.clientX - r.left, right: r.right - e.clientX, top: e.clientY - r.top, bottom: r.bottom - e.clientY };
    const side = Object.keys(dist).reduce((a, b) => (dist[a] <= dist[b] ? a : b));
    // the scale as the drag starts: the display shrinks as margins grow, the pointer's distance must not
    drag = { side, x: e.clientX, y: e.clientY, start: parseInt($("pad-" + side).value, 10) || 0, scale: state.scale };
    try { frame.setPointerCapture(e.pointerId); } catch (err) { /* as above */ }
  });
  frame.addEventListener("pointermove", (e) => {
    if (!drag) return;
    const sign = drag.side === "left" || drag.side === "top" ? -1 : 1;
    const moved = (drag.side === "left" || drag.side === "right" ? e.clientX - drag.x : e.clientY - drag.y) * sign;
    const step = (state.config && state.config.model.multiple) || 8;
    $("pad-" + drag.side).value = Math.max(0, Math.round((drag.start + moved / drag.scale) / step) * step);
    padsChanged();
  });
  for (const type of ["pointerup", "pointercancel"]) frame.addEventListener(type, () => { drag = null; });
}

function padsChanged() {
  sizeFromImage();
  layoutFrame();
}

// ---- ControlNet (sd-webui-controlnet's alwayson_scripts shape) ----

// The served ControlNets come with /studio/config (the list /controlnet/model_list gives A1111 clients).
function loadControl() {
  const models = (state.config && state.config.controlnets) || [];
  fillSelect($("control-model"), models, (m) => m, (m) => m);
  $("control-fields").hidden = !models.length;
  $("control-note").textContent = models.length ? "" : "No ControlNet models on this server.";
}

// What the preprocessor makes of the control image (the extension's /controlnet/detect), to tune thresholds.
async function previewControl() {
  if (!state.control) { say("Choose a control image first.", true); return; }
  try {
    const r = await post("/controlnet/detect", {
      controlnet_module: $("control-module").value, controlnet_input_images: [state.control],
      controlnet_threshold_a: parseFloat($("canny-low").value), controlnet_threshold_b: parseFloat($("canny-high").value),
    });
    $("control-map").src = "data:image/png;base64," + r.images[0];
    $("control-map").hidden = false;
  } catch (e) { say(e.message, true); }
}

function controlArgs() {
  if (!$("control-on").checked || !state.control) return null;
  return {
    controlnet: {
      args: [{
        enabled: true, image: state.control, module: $("control-module").value, model: $("control-model").value,
        weight: parseFloat($("control-weight").value), guidance_start: parseFloat($("control-start").value),
        guidance_end: parseFloat($("control-end").value),
        threshold_a: parseFloat($("canny-low").value), threshold_b: parseFloat($("canny-high").value),
      }],
    },
  };
}

// ---- generating: one request at a time, with progress, preview and queue position ----

function setBusy(busy) {
  state.busy = busy;
  $("generate").disabled = busy;
  $("cancel").disabled = !busy;
  $("live").hidden = !busy;
  if (!busy) { $("preview").hidden = true; $("bar").value = 0; $("queue").textContent = ""; }
}

async function pollProgress(track) {
  if (!state.busy) return;
  try {
    const p = await api("/sdapi/v1/progress");
    const job = p.state.job;
    if (job && job !== track.job) {  // a new job started: one fewer ahead of ours
      if (track.job !== undefined && track.ahead > 0) track.ahead -= 1;
      track.job = job;
    }
    if (!state.busy) return;
    if (track.ahead > 0) {
      $("queue").textContent = track.ahead + " ahead in the queue";
      say("Waiting: " + track.ahead + " job" + (track.ahead > 1 ? "s" : "") + " before this one...");
    } else if (p.state.job_count > 0) {
      $("queue").textContent = "";
      $("bar").value = p.progress;
      const st = p.state;
      say("Image " + (st.job_no + 1) + " of " + st.job_count + ", step " + st.sampling_step + " of " + st.sampling_steps
          + (p.eta_relative > 0 ? ", about " + Math.ceil(p.eta_relative) + " s left" : ""));
      if (p.current_image) { $("preview").src = "data:image/png;base64," + p.current_image; $("preview").hidden = false; }
    } else {
      say("Waiting for the model...");
    }
  } catch (e) { /* progress is best effort */ }
  if (state.busy) state.poll = setTimeout(() => pollProgress(track), 250);
}

async function run(route, body, kind) {
  state.controller = new AbortController();
  setBusy(true);
  say("Starting...");
  const track = { job: undefined, ahead: 0 };  // the jobs before ours: the running one and those queued
  try {
    const [h, p] = await Promise.all([api("/health"), api("/sdapi/v1/progress?skip_current_image=true")]);
    track.ahead = (h.busy ? 1 : 0) + h.queued;
    track.job = p.state.job || undefined;
  } catch (e) { /* unknown: assume none */ }
  pollProgress(track);
  try {
    const r = await post(route, body, state.controller.signal);
    const info = JSON.parse(r.info);
    if (!r.images.length) { say("Cancelled."); return; }
    for (let i = r.images.length - 1; i >= 0; i--) {  // newest first, a batch in seed order
      const s = Object.assign({}, body, { seed: info.all_seeds[i], batch_size: 1 });
      addResult(r.images[i], s, kind);
    }
    state.lastSeed = info.all_seeds[0];
    const notes = (info.warnings || []).length ? " (" + info.warnings.join("; ") + ")" : "";
    say("Done: " + r.images.length + " image" + (r.images.length > 1 ? "s" : "") + notes);
    if (state.history.on) { state.history.offset = 0; loadHistory(); }
  } catch (e) {
    if (e.name === "AbortError") say("Cancelled."); else say(e.message, true);
  } finally {
    clearTimeout(state.poll);
    setBusy(false);
  }
}

function generate() {
  if (state.busy || $("generate").disabled) return;
  const body = settings();
  if (!body.prompt.trim()) { say("Type a prompt first.", true); $("prompt").focus(); return; }
  let route = "/sdapi/v1/txt2img", kind = "";
  if (state.init) {
    route = "/sdapi/v1/img2img";
    body.init_images = [state.init];
    const [left, top, right, bottom] = pads();
    if (left + top + right + bottom > 0) {  // the server makes the mask and the size: the image plus the margins
      const fill = $("fill").value, feather = parseInt($("feather").value, 10) || 0;
      body.outpaint = { left, top, right, bottom, fill, feather };
      kind = "outpaint";
    } else {
      body.denoising_strength = parseFloat($("strength").value);
      kind = "img2img " + body.denoising_strength;
      const mask = maskPng();
      if (mask) {  // inpainting: A1111's default blur, the whole picture, starting from the image
        Object.assign(body, { mask, mask_blur: 4, inpaint_full_res: false, inpainting_fill: 1 });
        kind = "inpaint " + body.denoising_strength;
      }
    }
  }
  const control = controlArgs();
  if (control) body.alwayson_scripts = control;
  run(route, body, kind);
}

// Upscale a result: img2img from it at `factor` times its size, denoising `strength` (the two-pass workflow).
async function upscale(b64, s) {
  if (state.busy) return;
  const src = "data:image/png;base64," + b64;
  const im = await loadImage(src);  // its real size (an outpainted result is bigger than the form said)
  const factor = parseFloat($("up-factor").value);
  const m = (state.config && state.config.model) || { multiple: 16, max_width: Infinity, max_height: Infinity };
  const width = Math.round((im.naturalWidth * factor) / m.multiple) * m.multiple;
  const height = Math.round((im.naturalHeight * factor) / m.multiple) * m.multiple;
  if (width > m.max_width || height > m.max_height) {
    say("Upscaled, it would be " + width + "x" + height + "; this model makes at most " + m.max_width + "x" + m.max_height + ".", true);
    return;
  }
  const body = Object.assign({}, s, {
    init_images: [src], denoising_strength: parseFloat($("up-strength").value), width, height, batch_size: 1,
  });
  delete body.mask; delete body.outpaint; delete body.alwayson_scripts;
  run("/sdapi/v1/img2img", body, "upscale x" + factor);
}

function cancel() {
  // Closing the request cancels its job on the server, queued or running (and only this page's job).
  if (state.controller) state.controller.abort();
}

// ---- results and history cards ----

function card(src, s, note, buttons) {
  const el = document.createElement("div");
  el.className = "card";
  const img = document.createElement("img");
  img.src = src; img.alt = s.prompt || ""; img.loading = "lazy";
  img.addEventListener("click", () => { $("viewer-img").src = img.src; $("viewer").showModal(); });
  const meta = document.createElement("div");
  meta.className = "meta";
  const b = document.createElement("b");
  b.textContent = s.prompt || "";
  const parts = [s.seed !== undefined && "seed " + s.seed, s.width && s.width + "x" + s.height,
    s.steps && s.steps + " steps", s.cfg_scale !== undefined && "cfg " + s.cfg_scale, s.sampler_name, note].filter(Boolean);
  meta.append(b, document.createElement("br"), parts.join(" · "));
  const row = document.createElement("div");
  row.className = "buttons";
  for (const [label, action] of buttons) {
    let control;
    if (Array.isArray(action)) {  // a download link: [url, file name]
      control = document.createElement("a");
      control.href = action[0]; control.download = action[1]; control.textContent = label;
    } else {
      control = document.createElement("button");
      control.type = "button"; control.textContent = label;
      control.addEventListener("click", action);
    }
    row.append(control);
  }
  el.append(img, meta, row);
  return el;
}

function addResult(b64, s, note) {
  $("empty").hidden = true;
  const src = "data:image/png;base64," + b64;
  $("gallery").prepend(card(src, s, note, [
    ["Use these settings", () => useSettings(s)],
    ["Upscale", () => upscale(b64, s)],
    ["Download", [src, "sd35m-" + s.seed + ".png"]],
  ]));
}

// With an API key an <img> cannot send it: fetch the file and show it from a blob URL (a signed URL,
// `serve --signed-urls`, opens as it is). The previous page's blob URLs are released.
async function fileUrl(url) {
  if (!sessionStorage.getItem(KEY) || url.includes("sig=")) return url;
  const r = await fetch(url, { headers: headers() });
  const blob = URL.createObjectURL(await r.blob());
  state.history.blobs.push(blob);
  return blob;
}

async function loadHistory() {
  const h = state.history;
  const q = encodeURIComponent($("history-filter").value.trim());
  let page;
  try { page = await api("/studio/history?offset=" + h.offset + "&limit=" + HISTORY_PAGE + "&q=" + q); } catch (e) {
    $("page-info").textContent = e.message;
    return;
  }
  h.total = page.total;
  h.blobs.splice(0).forEach((url) => URL.revokeObjectURL(url));
  const cards = await Promise.all(page.items.map(async (item) => {
    const url = await fileUrl(item.url);
    const s = fromParameters(item);
    return card(url, s, item.name, [
      ["Use these settings", () => useSettings(s)],
      ["Download", [url, item.name]],
      ["Delete", () => removeHistory(item.name)],
    ]);
  }));
  $("history").replaceChildren(...cards);
  const pages = Math.max(1, Math.ceil(h.total / HISTORY_PAGE));
  $("page-info").textContent = h.total ? "Page " + (h.offset / HISTORY_PAGE + 1) + " of " + pages + " (" + h.total + " images)" : "No images yet.";
  $("newer").disabled = h.offset === 0;
  $("older").disabled = h.offset + HISTORY_PAGE >= h.total;
}

async function removeHistory(name) {
  if (!confirm("Delete " + name + " from the output folder?")) return;
  try {
    await api("/studio/history/" + encodeURIComponent(name), { method: "DELETE" });
    if (state.history.offset >= state.history.total - 1) state.history.offset = Math.max(0, state.history.offset - HISTORY_PAGE);
    await loadHistory();
  } catch (e) { say(e.message, true); }
}

// ---- wiring ----

function wire() {
  $("form").addEventListener("submit", (e) => { e.preventDefault(); generate(); });
  $("form").addEventListener("keydown", (e) => {
    const t = e.target;
    const typing = t.tagName === "TEXTAREA" || (t.tagName === "INPUT" && !["range", "search", "file", "checkbox"].includes(t.type));
    if (e.key === "Enter" && !e.shiftKey && typing) { e.preventDefault(); generate(); }
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && state.busy) cancel(); });
  $("cancel").addEventListener("click", cancel);
  $("model").addEventListener("change", switchModel);
  $("aspect").addEventListener("change", applyAspect);
  $("dice").addEventListener("click", () => { $("seed").value = -1; });
  $("reuse").addEventListener("click", () => { if (state.lastSeed !== null) $("seed").value = state.lastSeed; });
  $("prompt").addEventListener("blur", () => { state.caret = $("prompt").selectionEnd; });
  $("lora-search").addEventListener("input", filterLoras);
  $("refresh-loras").addEventListener("click", async () => {
    try { await post("/sdapi/v1/refresh-loras", {}); await loadLoras(); filterLoras(); } catch (e) { say(e.message, true); }
  });
  $("viewer").addEventListener("click", () => $("viewer").close());
  $("file").addEventListener("change", () => setInit($("file").files[0]));
  document.addEventListener("dragover", (e) => { e.preventDefault(); document.body.classList.add("dragging"); });
  document.addEventListener("dragleave", () => document.body.classList.remove("dragging"));
  document.addEventListener("drop", (e) => {  // a drop on the mask box is the mask, anywhere else the image
    e.preventDefault();
    document.body.classList.remove("dragging");
    const file = e.dataTransfer.files[0];
    if (!file) return;
    if (e.target.closest && e.target.closest("#mask-box") && state.init) setMaskFile(file); else setInit(file);
  });
  $("strength").addEventListener("input", () => { $("strength-value").textContent = parseFloat($("strength").value).toFixed(2); });
  $("brush").addEventListener("input", () => { $("brush-value").textContent = $("brush").value; });
  $("mask-mode").addEventListener("click", () => setMode("mask"));
  $("outpaint-mode").addEventListener("click", () => setMode("outpaint"));
  $("clear-init").addEventListener("click", clearInit);
  $("eraser").addEventListener("click", () => { state.eraser = !state.eraser; $("eraser").setAttribute("aria-pressed", String(state.eraser)); });
  $("invert").addEventListener("click", () => mapMask((d, i) => 255 - d[i + 3]));
  $("clear-mask").addEventListener("click", () => { const c = $("mask-canvas"); c.getContext("2d").clearRect(0, 0, c.width, c.height); });
  $("mask-file").addEventListener("change", () => setMaskFile($("mask-file").files[0]));
  for (const id of ["pad-left", "pad-top", "pad-right", "pad-bottom"]) $(id).addEventListener("input", padsChanged);
  paintEvents();
  outpaintEvents();
  window.addEventListener("resize", layoutFrame);
  $("control-file").addEventListener("change", async () => {
    try {
      state.control = await readFile($("control-file").files[0]);
      $("control-thumb").src = state.control; $("control-thumb").hidden = false; $("control-on").checked = true;
    } catch (e) { say(e.message, true); }
  });
  $("control-module").addEventListener("change", () => { $("canny-fields").hidden = $("control-module").value !== "canny"; });
  $("canny-fields").hidden = true;
  $("detect").addEventListener("click", previewControl);
  $("history-filter").addEventListener("input", () => {
    clearTimeout(state.history.timer);
    state.history.timer = setTimeout(() => { state.history.offset = 0; loadHistory(); }, 250);
  });
  $("newer").addEventListener("click", () => { state.history.offset = Math.max(0, state.history.offset - HISTORY_PAGE); loadHistory(); });
  $("older").addEventListener("click", () => { state.history.offset += HISTORY_PAGE; loadHistory(); });
  $("key").value = sessionStorage.getItem(KEY) || "";
  $("key").addEventListener("change", () => { sessionStorage.setItem(KEY, $("key").value); start(); });
}

// Ask the server what it offers; Generate is enabled once the model and its limits are known.
async function start() {
  try {
    const [samplers, schedulers, models, options] = await Promise.all([
      api("/sdapi/v1/samplers"), api("/sdapi/v1/schedulers"), api("/sdapi/v1/sd-models"), api("/sdapi/v1/options"),
    ]);
    fillSelect($("sampler"), samplers, (s) => s.name, (s) => s.name);
    fillSelect($("scheduler"), schedulers, (s) => s.name, (s) => s.label);
    fillSelect($("model"), models, (m) => m.title, (m) => m.model_name);
    $("model").value = options.sd_model_checkpoint;
    await loadConfig(true);
    $("generate").disabled = state.busy;
    document.body.dataset.ready = "1";
    window.studioReadyAt = performance.now();
    loadLoras();
    loadControl();
  } catch (e) { say(e.message, true); }
}

wire();
start();
