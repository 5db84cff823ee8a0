// IDDM live chart: draws the loss and each face recogniser's similarity on the "IDDM Train LoRA" node while it
// trains, from the "iddm.progress" websocket events the node sends (numbers only, never photo names).
// Status text: the text a node returns in its `ui` (Load Private Refs: counts and the photos left out; PGD
// Two-Stage: the settings in effect; Train LoRA, Protect Photos, Identity Leak Meter: their summaries) is drawn in
// a space each node reserves from the start (STATUS_LINES), so a node never grows over the one placed below it;
// longer text is cut (the node's `summary` output has all of it). It is kept on the node object only, never in a
// widget, so it is not saved with the workflow.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPES = new Set(["IDDMTrainLoRA", "IDDMPGDTwoStage"]);
const MAX_POINTS = 400;          // keep the chart cheap to draw on long runs
const CHART_HEIGHT = 120;
const PAD = 8;
// node type -> lines of status text it reserves room for (the shipped workflows' node sizes include this room)
const STATUS_LINES = { IDDMLoadPrivateRefs: 4, IDDMPGDTwoStage: 6, IDDMTrainLoRA: 10, IDDMProtectPhotos: 8,
                       IDDMIdentityLeakMeter: 6 };
const STATUS_LINE = 14;
const STATUS_CHARS = 60;         // wrap width in characters (11px sans-serif on a ~380px node)
const COLORS = ["#4fc3f7", "#ffb74d", "#ba68c8", "#81c784", "#e57373", "#fff176", "#90a4ae"];

// node id -> { loss: [], sims: {name: []}, text: "" }
const runs = new Map();

function runFor(nodeId) {
  if (!runs.has(nodeId)) runs.set(nodeId, { loss: [], sims: {}, text: "", done: 0, total: 0 });
  return runs.get(nodeId);
}

function push(series, value) {
  series.push(value);
  if (series.length > MAX_POINTS) series.splice(0, series.length - MAX_POINTS);
}

function statusText(d) {
  // setup (checking, loading the model, class images, trial steps): the step in words, sent before any training
  if (d.phase === "setup") return `setting up: ${d.message || d.stage || ""}`;
  const parts = [d.phase];
  if (d.k != null) parts.push(`k=${d.k}`);
  if (d.t != null) parts.push(`t=${d.t}${d.stage ? " " + (d.stage === "rec" ? "Stage I" : "Stage II") : ""}`);
  if (d.total) parts.push(`${d.done}/${d.total}`);
  if (d.loss != null) parts.push(`loss ${d.loss.toFixed(4)}`);
  if (d.linf != null) parts.push(`|d| ${(d.linf * 255).toFixed(1)}/255`);
  return parts.join("  ");
}

function onProgress(event) {
  const d = event.detail;
  if (!d || d.node == null) return;
  const run = runFor(String(d.node));
  if (d.phase === "setup" || (d.done === 1 && run.done > 1)) {   // a new run on the same node
    run.loss = []; run.sims = {};
  }
  if (d.loss != null && (d.phase === "pgd" || d.phase === "finetune")) push(run.loss, { v: d.loss, phase: d.phase });
  for (const [name, value] of Object.entries(d.similarity || {})) {
    if (value == null) continue;
    if (!run.sims[name]) run.sims[name] = [];
    push(run.sims[name], value);
  }
  run.text = statusText(d);
  run.done = d.done; run.total = d.total;
  const node = app.graph?.getNodeById?.(Number(d.node));
  if (node) node.setDirtyCanvas(true, true);
}

function range(values) {
  let lo = Infinity, hi = -Infinity;
  for (const v of values) { if (v < lo) lo = v; if (v > hi) hi = v; }
  if (!isFinite(lo)) return [0, 1];
  if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
  return [lo, hi];
}

function line(ctx, values, x0, y0, w, h, lo, hi, color) {
  if (values.length < 2) return;
  ctx.strokeStyle = color;
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  values.forEach((v, i) => {
    const x = x0 + (i / (values.length - 1)) * w;
    const y = y0 + h - ((v - lo) / (hi - lo)) * h;
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
}

function drawChart(node, ctx) {
  const run = runs.get(String(node.id));
  if (!run || (!run.loss.length && !Object.keys(run.sims).length && !run.text)) return;
  const w = node.size[0] - 2 * PAD;
  const top = node.size[1] - CHART_HEIGHT - PAD;
  const h = CHART_HEIGHT - 30;
  ctx.save();
  ctx.fillStyle = "rgba(0,0,0,0.35)";
  ctx.fillRect(PAD, top, w, CHART_HEIGHT);
  ctx.font = "11px sans-serif";
  ctx.fillStyle = "#ddd";
  ctx.fillText(run.text, PAD + 4, top + 12);
  const plotTop = top + 18;
  // loss on its own scale (left half of the legend), similarities on [-1, 1]-clipped shared scale
  const loss = run.loss.map((p) => p.v);
  const [llo, lhi] = range(loss);
  line(ctx, loss, PAD + 4, plotTop, w - 8, h, llo, lhi, "#eeeeee");
  const names = Object.keys(run.sims);
  const allSims = names.flatMap((n) => run.sims[n]);
  const [slo, shi] = range(allSims);
  names.forEach((name, i) => line(ctx, run.sims[name], PAD + 4, plotTop, w - 8, h, slo, shi, COLORS[i % COLORS.length]));
  let x = PAD + 4;
  const legendY = top + CHART_HEIGHT - 4;
  ctx.fillStyle = "#eeeeee";
  ctx.fillText(`loss ${loss.length ? loss[loss.length - 1].toFixed(3) : ""}`, x, legendY);
  x += 80;
  names.forEach((name, i) => {
    const s = run.sims[name];
    ctx.fillStyle = COLORS[i % COLORS.length];
    ctx.fillText(`${name} ${s.length ? s[s.length - 1].toFixed(3) : ""}`, x, legendY);
    x += 90;
  });
  ctx.restore();
}

function wrapStatus(text, maxLines) {
  const out = [];
  for (const raw of String(text || "").split("\n")) {
    let line = "";
    for (const word of raw.split(" ")) {
      if (line && line.length + 1 + word.length > STATUS_CHARS) { out.push(line); line = "  " + word; }
      else line = line ? line + " " + word : word;
    }
    out.push(line);
  }
  const lines = out.filter((l, i) => l || i < out.length - 1);
  if (lines.length > maxLines) lines.splice(maxLines - 1, lines.length, "... (all of it: the summary output)");
  return lines;
}

function statusHeight(nodeType) {
  return (STATUS_LINES[nodeType] || 0) * STATUS_LINE + 8;
}

function drawStatus(node, ctx, below) {
  const lines = node.iddmStatus;
  if (!lines?.length) return;
  const h = statusHeight(node.type || node.comfyClass);
  const top = node.size[1] - below - h;
  ctx.save();
  ctx.fillStyle = "rgba(0,0,0,0.25)";
  ctx.fillRect(PAD, top, node.size[0] - 2 * PAD, h - 4);
  ctx.font = "11px sans-serif";
  ctx.fillStyle = "#ddd";
  lines.forEach((line, i) => ctx.fillText(line, PAD + 4, top + 12 + i * STATUS_LINE, node.size[0] - 2 * PAD - 8));
  ctx.restore();
}

app.registerExtension({
  name: "iddm.live_chart",
  async setup() {
    api.addEventListener("iddm.progress", onProgress);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const chart = NODE_TYPES.has(nodeData.name);
    const status = nodeData.name in STATUS_LINES;
    if (!chart && !status) return;
    const chartSpace = chart ? CHART_HEIGHT + PAD : 0;
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const r = onDrawForeground?.apply(this, arguments);
      if (!this.flags?.collapsed) {
        if (status) drawStatus(this, ctx, chartSpace);
        if (chart) drawChart(this, ctx);
      }
      return r;
    };
    const computeSize = nodeType.prototype.computeSize;
    nodeType.prototype.computeSize = function () {
      const size = computeSize ? computeSize.apply(this, arguments) : [320, 200];
      return [Math.max(size[0], 320), size[1] + chartSpace + (status ? statusHeight(nodeData.name) : 0)];
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      // a workflow saved before the room was reserved: make the node tall enough once, when it is loaded
      const r = onConfigure?.apply(this, arguments);
      const size = this.computeSize();
      if (this.size[1] < size[1]) this.setSize([Math.max(this.size[0], size[0]), size[1]]);
      return r;
    };
    if (status) {
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        const r = onExecuted?.apply(this, arguments);
        // drawn into the room the node reserved: the node keeps its size, whatever the text's length
        this.iddmStatus = message?.text ? wrapStatus(message.text.join("\n"), STATUS_LINES[nodeData.name]) : [];
        this.setDirtyCanvas(true, true);
        return r;
      };
    }
  },
});
