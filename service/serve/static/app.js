"use strict";
const $ = (id) => document.getElementById(id);
let result = null, image = null, info = null, shown = null;
const calibration = {};  // score -> sorted clean calibration values (thresholded form)
const FRIENDLY = {
  payload_too_large: "The file (or its pixel count) is too large for this server.",
  unsupported_media_type: "That is not an image this server can read.",
  bad_image: "The file could not be decoded as an image.",
  non_finite: "The image holds values that are not finite numbers.",
  unauthorized: "The server needs an API key: enter it above.",
  forbidden: "The API key was not accepted.",
  overloaded: "The server is busy: try again in a moment.",
  queue_timeout: "The server is busy: try again in a moment.",
  shutting_down: "The server is restarting: try again in a moment.",
  not_ready: "The model is still loading: try again in a moment.",
};

function showError(msg) { const e = $("error"); e.textContent = msg; e.hidden = !msg; }
function auth() { const k = $("key").value.trim(); return k ? { authorization: "Bearer " + k } : {}; }

let current = null;  // the model picked; null: the server's default (/v1/model, /v1/detect)
const modelPath = () => (current ? `/v1/models/${encodeURIComponent(current)}` : "/v1/model");
const detectPath = () => (current ? `${modelPath()}/detect` : "/v1/detect");

async function loadModels() {  // the picker, shown when the server serves several models
  const r = await fetch("/v1/models", { headers: auth() });
  if (r.ok) {
    const b = await r.json(), sel = $("models");
    sel.innerHTML = "";
    for (const m of b.models) { const o = document.createElement("option"); o.value = o.textContent = m.name; sel.appendChild(o); }
    if (!b.models.some((m) => m.name === current)) current = b.default;
    sel.value = current;
    $("picker").hidden = b.models.length < 2;
  }
  await loadModel();
}

async function pickModel() {
  current = $("models").value;
  for (const k of Object.keys(calibration)) delete calibration[k];
  result = null;
  $("verdict").hidden = true;
  await loadModel();
}

async function loadModel() {
  const r = await fetch(modelPath(), { headers: auth() });
  if (!r.ok) { $("model").textContent = "model not ready"; return; }
  const m = await r.json(), c = m.card, cal = m.calibration;
  info = m;
  const g = $("gallery"); g.innerHTML = "";
  for (const e of m.examples || []) {
    const b = document.createElement("button");
    b.type = "button";
    b.title = `${e.kind === "clean" ? "clean" : e.attack} — true label ${e.true_label}`;
    b.setAttribute("aria-label", b.title);
    b.innerHTML = `<img src="${e.url}" alt=""><span>${e.kind} ${e.true_label}</span>`;
    b.addEventListener("click", async () => detect(new File([await (await fetch(e.url)).blob()], e.file, { type: "image/png" })));
    g.appendChild(b);
  }
  const full = m.disclosure !== "verdict";
  for (const id of ["calibration", "scores"]) $(id).closest(id === "scores" ? ".table-wrap" : "figure").hidden = !full;
  document.querySelector(".view .controls").hidden = !full;
  if (!cal) { $("model").textContent = `${c.name} v${c.version} on ${m.device} · this client gets verdicts only`; return; }
  $("model").textContent = `${c.name} v${c.version} on ${m.device} · test accuracy ${(100 * c.test_accuracy).toFixed(2)}% · ` +
    `calibrated on ${cal.data.correct} clean images (${cal.created.slice(0, 10)}), decision ` + (cal.components
      ? `the smallest p-value of ${cal.components.map((x) => x.score).join(", ")}, calibrated on n = ${cal.n} of them held apart`
      : `statistic ${cal.statistic} (${cal.tail})`) + `, α = ${cal.alpha}`;
}

async function detect(file) {
  showError("");
  const query = info && info.disclosure === "verdict" ? "" : "?scores=all&heatmaps=fis,eigvec,fisher_diag,saliency";
  const r = await fetch(`${detectPath()}${query}`, {
    method: "POST", headers: { "content-type": file.type || "application/octet-stream", ...auth() }, body: file });
  const body = await r.json();
  if (!r.ok) {
    const e = body.error || { code: `http_${r.status}`, message: r.statusText };
    showError(`${FRIENDLY[e.code] || "The request failed."} (${e.code}: ${e.message})`);
    return;
  }
  result = body.results[0];
  image = await createImageBitmap(file);
  render();
}

function colour(t, signed) {  // t in [0,1]; signed maps: blue-white-red, else black-yellow
  if (signed) { const u = 2 * t - 1; return u < 0 ? [255 * (1 + u), 255 * (1 + u), 255] : [255, 255 * (1 - u), 255 * (1 - u)]; }
  return [255 * Math.min(1, 2 * t), 255 * Math.max(0, 2 * t - 1), 40];
}

async function calibrationValues(score) {
  if (!(score in calibration)) {
    const r = await fetch(`${modelPath()}/calibration/${score}`, { headers: auth() });
    calibration[score] = r.ok ? (await r.json()).values : null;
  }
  return calibration[score];
}

function thresholded(score, raw) {  // the form the calibration keeps: log10 for Fisher scores
  return info && info.scores[score] && info.scores[score].log10 ? Math.log10(Math.max(raw, 1e-30)) : raw;
}

function sideOf(values, t, direction) {  // "high" or "low": which tail the value sits in
  if (direction === "high" || direction === "low") return direction;
  return t >= values[Math.floor(values.length / 2)] ? "high" : "low";
}

function fractionAsExtreme(values, t, side) {
  const n = side === "high" ? values.filter((v) => v >= t).length : values.filter((v) => v <= t).length;
  return n / values.length;
}

function pct(f) { return f < 0.001 ? "fewer than 0.1%" : f < 0.1 ? `${(100 * f).toFixed(1)}%` : `${Math.round(100 * f)}%`; }

async function render() {
  const d = result.decision;
  $("verdict").hidden = false;
  if (d.p_value === undefined) {  // disclosure level verdict: the class and the flag, nothing continuous
    $("sentence").innerHTML = `Predicted <b>${result.label}</b>. ` + (d.flagged
      ? `<span class="flagged">Flagged</span> as likely adversarial at α = ${d.alpha}.`
      : `<span class="clean">Not flagged</span> at α = ${d.alpha}.`);
    const ctx = $("canvas").getContext("2d");
    ctx.clearRect(0, 0, $("canvas").width, $("canvas").height);
    ctx.drawImage(image, 0, 0, $("canvas").width, $("canvas").height);
    return;
  }
  const combined = !!d.components;
  const stat = combined ? d.components[0].score : d.statistic;
  const values = await calibrationValues(stat), t = thresholded(stat, result.scores[stat]);
  const twoSided = d.tail === "two-sided";
  const side = values ? sideOf(values, t, twoSided ? null : info.scores[stat].direction) : "high";
  const frac = values ? fractionAsExtreme(values, t, side) : NaN;
  const share = pct(frac), few = share.startsWith("fewer");
  const verdict = d.flagged ? `<span class="flagged">Flagged</span>: ` : `<span class="clean">Not flagged</span>: `;
  const against = `${d.flagged ? "at or below" : "above"} α = ${d.alpha}, the share of clean images the threshold may flag.`;
  $("sentence").innerHTML = `Predicted <b>${result.label}</b> (confidence ${result.confidence.toFixed(4)}). ` + verdict + (combined
    ? `the most unusual of its ${d.components.map((c) => `${c.score} (${c.tail})`).join(", ")} p-values, measured against ` +
      `clean images, gives a combined p-value of ${d.p_value.toFixed(4)}, ${against}`
    : `${d.flagged && !few ? "only " : ""}${share} of clean calibration images have a ${d.statistic} this ${side} or ` +
      `${side === "high" ? "higher" : "lower"}. Its ${twoSided ? "two-sided p-value (both unusually high and unusually low count)" : "p-value"} ` +
      `is ${d.p_value.toFixed(4)}, ${against}`);
  const tbody = $("scores").querySelector("tbody"); tbody.innerHTML = "";
  for (const [k, v] of Object.entries(result.scores)) {
    const tr = document.createElement("tr");
    tr.innerHTML = `<td><button type="button" class="score" aria-label="show the calibration distribution of ${k}">${k}</button></td>` +
      `<td>${v.toExponential(3)}</td><td>${(result.p_values[k] ?? NaN).toFixed(4)}</td>`;
    tr.querySelector("button").addEventListener("click", () => histogram(k));
    tbody.appendChild(tr);
  }
  const sel = $("map");
  if (!sel.options.length) for (const k of Object.keys(result.heatmaps)) sel.add(new Option(k, k));
  await histogram(shown && shown in result.scores ? shown : stat);
  await draw();
}

async function histogram(score) {  // the clean calibration distribution of one score, with this image marked
  shown = score;
  const values = await calibrationValues(score), cv = $("hist"), ctx = cv.getContext("2d");
  ctx.clearRect(0, 0, cv.width, cv.height);
  if (!values || !values.length) { $("hist-caption").textContent = `no calibration values for ${score}`; return; }
  const t = thresholded(score, result.scores[score]);
  const lo = Math.min(values[0], t), hi = Math.max(values[values.length - 1], t), bins = 40, w = cv.width, h = cv.height - 14;
  const width = (hi - lo) / bins || 1, counts = new Array(bins).fill(0);
  for (const v of values) counts[Math.min(bins - 1, Math.floor((v - lo) / width))]++;
  const top = Math.max(...counts);
  ctx.fillStyle = "#7a9cb8";
  counts.forEach((c, i) => ctx.fillRect((i * w) / bins + 0.5, h - (h * c) / top, w / bins - 1, (h * c) / top));
  const x = Math.min(w - 2, Math.max(1, ((t - lo) / (hi - lo || 1)) * w));
  ctx.fillStyle = "#c0182b"; ctx.fillRect(x - 1, 0, 3, h);
  ctx.beginPath(); ctx.moveTo(x, h); ctx.lineTo(x - 6, h + 12); ctx.lineTo(x + 6, h + 12); ctx.fill();
  const log = info.scores[score] && info.scores[score].log10;
  cv.dataset.marker = String(x);
  $("hist-lo").textContent = lo.toPrecision(3); $("hist-hi").textContent = hi.toPrecision(3);
  $("hist-caption").textContent = `${log ? "log10 " : ""}${score} on ${values.length} clean calibration images; ` +
    `red marker: this image (${t.toPrecision(3)}, p = ${(result.p_values[score] ?? NaN).toFixed(4)})`;
}

async function draw() {
  const cv = $("canvas"), ctx = cv.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.clearRect(0, 0, cv.width, cv.height);
  ctx.drawImage(image, 0, 0, cv.width, cv.height);
  const h = result.heatmaps[$("map").value];
  if (!h) return;
  const png = await createImageBitmap(await (await fetch("data:image/png;base64," + h.png_base64)).blob());
  const off = new OffscreenCanvas(png.width, png.height), octx = off.getContext("2d");
  octx.drawImage(png, 0, 0);
  const px = octx.getImageData(0, 0, png.width, png.height);
  const signed = h.min < 0 && h.max > 0, zero = signed ? -h.min / (h.max - h.min) : 0;
  for (let i = 0; i < px.data.length; i += 4) {
    let t = px.data[i] / 255;
    if (signed) { const v = h.min + t * (h.max - h.min), m = Math.max(-h.min, h.max); t = 0.5 + 0.5 * v / m; }
    const [r, g, b] = colour(t, signed);
    px.data[i] = r; px.data[i + 1] = g; px.data[i + 2] = b; px.data[i + 3] = 255;
  }
  octx.putImageData(px, 0, 0);
  ctx.globalAlpha = parseFloat($("opacity").value);
  ctx.drawImage(off, 0, 0, cv.width, cv.height);
  ctx.globalAlpha = 1;
  const lg = $("legend").getContext("2d");
  for (let x = 0; x < 200; x++) { const [r, g, b] = colour(x / 199, signed); lg.fillStyle = `rgb(${r},${g},${b})`; lg.fillRect(x, 0, 1, 12); }
  const m = Math.max(-h.min, h.max);
  $("lo").textContent = (signed ? -m : h.min).toExponential(2); $("hi").textContent = (signed ? m : h.max).toExponential(2);
}

$("file").addEventListener("change", (e) => e.target.files[0] && detect(e.target.files[0]));
$("map").addEventListener("change", draw);
$("opacity").addEventListener("input", draw);
const drop = $("drop");
drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); } });
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); if (e.dataTransfer.files[0]) detect(e.dataTransfer.files[0]); });
window.addEventListener("paste", (e) => { const f = [...e.clipboardData.files][0]; if (f) detect(f); });
$("key").addEventListener("change", loadModels);
$("models").addEventListener("change", pickModel);
loadModels();
