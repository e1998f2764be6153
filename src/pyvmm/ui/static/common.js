// pyvmm ui: what every page shares. Vanilla JS, no build step.
"use strict";

const TOKEN = document.querySelector('meta[name="pyvmm-token"]').content;

// A request to the UI's JSON API; the token goes in a header (state changes need it).
async function api(method, path, body) {
  const options = { method, headers: { "X-Pyvmm-Token": TOKEN } };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch("/api" + path, options);
  } catch (error) {
    return { ok: false, status: 0, data: { error: "the pyvmm ui server does not answer (stopped?)" } };
  }
  let data = null;
  try { data = await response.json(); } catch (error) { data = null; }
  return { ok: response.ok, status: response.status, data };
}

function el(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

// Polite announcements for screen readers (and a visible status line).
function announce(message, isError) {
  const status = document.getElementById("status");
  if (!status) return;
  status.textContent = message;
  status.classList.toggle("error", Boolean(isError));
}

function fmtBytes(bytes) {
  if (bytes === null || bytes === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes, unit = 0;
  while (Math.abs(value) >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return (unit ? value.toFixed(1) : String(Math.round(value))) + " " + units[unit];
}

function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  seconds = Math.floor(seconds);
  const d = Math.floor(seconds / 86400), h = Math.floor(seconds % 86400 / 3600);
  const m = Math.floor(seconds % 3600 / 60), s = seconds % 60;
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  if (m) return `${m}m ${s}s`;
  return `${s}s`;
}

function fmtNumber(value, digits) {
  if (value === null || value === undefined || Number.isNaN(value)) return "-";
  return value.toFixed(digits === undefined ? 1 : digits);
}

function fmtTime(epochSeconds) {
  return epochSeconds ? new Date(epochSeconds * 1000).toLocaleTimeString() : "-";
}

// Rates from cumulative counters: the server keeps no history, the page does.
class Rates {
  constructor(keep) { this.keep = keep || 60; this.previous = new Map(); this.series = new Map(); }
  // counters: {name: cumulative value}; returns {name: per-second rate} (null on the first sample)
  update(key, time, counters) {
    const before = this.previous.get(key);
    this.previous.set(key, { time, counters });
    const rates = {};
    for (const [name, value] of Object.entries(counters)) {
      let rate = null;
      if (before && time > before.time && typeof before.counters[name] === "number" && typeof value === "number") {
        rate = Math.max(0, (value - before.counters[name]) / (time - before.time));
      }
      rates[name] = rate;
      if (rate !== null) this.push(key + "/" + name, rate);
    }
    return rates;
  }
  push(seriesKey, value) {
    const values = this.series.get(seriesKey) || [];
    values.push(value);
    if (values.length > this.keep) values.shift();
    this.series.set(seriesKey, values);
  }
  values(seriesKey) { return this.series.get(seriesKey) || []; }
  forget(key) { this.previous.delete(key); }
}

// A small SVG sparkline; its text alternative says the latest value and the range shown.
function sparkline(values, label, width, height) {
  width = width || 120; height = height || 28;
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("role", "img");
  svg.setAttribute("preserveAspectRatio", "none");
  const max = Math.max(1e-9, ...values);
  const latest = values.length ? values[values.length - 1] : null;
  svg.setAttribute("aria-label", values.length
    ? `${label}: latest ${fmtNumber(latest)}, highest ${fmtNumber(max)} over the last ${values.length} samples`
    : `${label}: no samples yet`);
  if (values.length > 1) {
    const step = width / (values.length - 1);
    const points = values.map((v, i) => `${(i * step).toFixed(1)},${(height - 2 - (v / max) * (height - 4)).toFixed(1)}`);
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", points.join(" "));
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", "currentColor");
    line.setAttribute("stroke-width", "1.5");
    line.setAttribute("vector-effect", "non-scaling-stroke");
    svg.append(line);
  }
  return svg;
}

function stateClass(state) { return "state state-" + String(state).replace(/\s+/g, "-"); }

// Which lifecycle buttons make sense in a state (the API refuses the others anyway).
function actionsFor(state) {
  const running = state === "running", paused = state === "paused";
  const stopped = state === "shut off" || state === "crashed" || state === "migrated";
  return [
    { action: "start", label: "Start", enabled: stopped },
    { action: "suspend", label: "Suspend", enabled: running },
    { action: "resume", label: "Resume", enabled: paused },
    { action: "shutdown", label: "Shut down", enabled: running },
    { action: "reboot", label: "Reboot", enabled: running },
    { action: "destroy", label: "Destroy", enabled: running || paused || state === "unresponsive", danger: true },
    { action: "clone", label: "Clone", enabled: stopped || paused },
    { action: "delete", label: "Delete", enabled: stopped, danger: true },
  ];
}

// A modal question (the <dialog id="ask"> every page has): resolves to the typed text, true, or null.
function ask(question, withInput, initial) {
  const dialog = document.getElementById("ask");
  const input = document.getElementById("ask-input");
  document.getElementById("ask-label").textContent = question;
  input.hidden = !withInput;
  input.value = initial || "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      if (dialog.returnValue !== "ok") resolve(null);
      else resolve(withInput ? input.value : true);
    }, { once: true });
    dialog.returnValue = "";
    dialog.showModal();
    (withInput ? input : document.getElementById("ask-ok")).focus();
  });
}

// Run a lifecycle action; clone asks for the new name, delete and destroy for confirmation.
async function runAction(name, action) {
  let body = {};
  if (action === "clone") {
    const newName = await ask(`Name of the copy of ${name}`, true, name + "-clone");
    if (newName === null) return false;
    body = { new_name: newName };
  } else if (action === "delete" || action === "destroy") {
    const what = action === "delete" ? "Delete the definition and records of" : "Stop at once (like pulling the plug)";
    if ((await ask(`${what} ${name}?`, false)) === null) return false;
  }
  announce(`${action} ${name}...`);
  const result = await api("POST", `/vms/${encodeURIComponent(name)}/actions/${action}`, body);
  if (result.ok) announce(`${name}: ${action} done`);
  else announce(`${name}: ${action} failed: ${result.data && result.data.error}`, true);
  return result.ok;
}

function actionButtons(name, state, onDone) {
  const group = el("div", { role: "group", "aria-label": `Actions for ${name}`, class: "actions" });
  for (const item of actionsFor(state)) {
    const button = el("button", { type: "button", "data-action": item.action, disabled: !item.enabled,
      "aria-label": `${item.label} ${name}`, class: item.danger ? "danger" : null, text: item.label });
    button.addEventListener("click", async () => {
      button.disabled = true;
      await runAction(name, item.action);
      if (onDone) onDone(item.action);
    });
    group.append(button);
  }
  return group;
}
