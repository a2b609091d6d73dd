"use strict";
const $ = (id) => document.getElementById(id);
let result = null, image = null;

function showError(msg) { const e = $("error"); e.textContent = msg; e.hidden = !msg; }
function auth() { const k = $("key").value.trim(); return k ? { authorization: "Bearer " + k } : {}; }

async function loadModel() {
  const r = await fetch("/v1/model", { headers: auth() });
  if (!r.ok) { $("model").textContent = "model not ready"; return; }
  const m = await r.json(), c = m.card, cal = m.calibration;
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
  $("model").textContent = `${c.name} v${c.version} on ${m.device} · test accuracy ${(100 * c.test_accuracy).toFixed(2)}% · ` +
    `calibrated on n = ${cal.n} clean images (${cal.created.slice(0, 10)}), decision statistic ${cal.statistic}, α = ${cal.alpha}`;
}

async function detect(file) {
  showError("");
  const r = await fetch("/v1/detect?scores=all&heatmaps=fis,eigvec,fisher_diag,saliency", {
    method: "POST", headers: { "content-type": file.type || "application/octet-stream", ...auth() }, body: file });
  const body = await r.json();
  if (!r.ok) { showError(`${body.error.code}: ${body.error.message}`); return; }
  result = body.results[0];
  image = await createImageBitmap(file);
  render();
}

function colour(t, signed) {  // t in [0,1]; signed maps: blue-white-red, else black-yellow
  if (signed) { const u = 2 * t - 1; return u < 0 ? [255 * (1 + u), 255 * (1 + u), 255] : [255, 255 * (1 - u), 255 * (1 - u)]; }
  return [255 * Math.min(1, 2 * t), 255 * Math.max(0, 2 * t - 1), 40];
}

async function render() {
  const d = result.decision;
  $("verdict").hidden = false;
  $("sentence").innerHTML = `Predicted <b>${result.label}</b> (confidence ${result.confidence.toFixed(4)}). ` +
    (d.flagged ? `<span class="flagged">Flagged</span>: ` : `<span class="clean">Not flagged</span>: `) +
    `only ${(100 * d.p_value).toFixed(2)}% of clean calibration images have a ${d.statistic} at least this unusual ` +
    `(p = ${d.p_value.toFixed(4)} ${d.flagged ? "≤" : ">"} α = ${d.alpha}).`;
  const tbody = $("scores").querySelector("tbody"); tbody.innerHTML = "";
  for (const [k, v] of Object.entries(result.scores)) {
    const tr = document.createElement("tr");
    tr.innerHTML = `<td>${k}</td><td>${v.toExponential(3)}</td><td>${(result.p_values[k] ?? NaN).toFixed(4)}</td>`;
    tbody.appendChild(tr);
  }
  const sel = $("map");
  if (!sel.options.length) for (const k of Object.keys(result.heatmaps)) sel.add(new Option(k, k));
  await draw();
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
$("key").addEventListener("change", loadModel);
loadModel();
