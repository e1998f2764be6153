// One VM: summary, live charts, controls its API offers, snapshots, events, devices, definition.
"use strict";

const NAME = decodeURIComponent(location.pathname.split("/")[2]);
const PATH = `/vms/${encodeURIComponent(NAME)}`;
const POLL_MS = 2000;
const rates = new Rates(60);
const charts = new Map();         // key -> {box, value}
const shown = { state: undefined, snapshots: "", devices: "", definition: "", config: "", controls: "" };
const events = [];
let seenState;

document.title = `${NAME} - pyvmm`;
document.getElementById("title").textContent = NAME;
document.getElementById("console-link").href = `/vm/${encodeURIComponent(NAME)}/console`;

function chart(container, key, title) {
  let entry = charts.get(key);
  if (!entry) {
    const value = el("span", { class: "value" });
    const box = el("div", { class: "chart", "data-chart": key }, el("h3", { text: title }), value);
    document.getElementById(container).append(box);
    entry = { box, value };
    charts.set(key, entry);
  }
  return entry;
}

// One chart of a series the page keeps: its latest value as text, the sparkline beside it.
function plot(container, key, title, values, text) {
  const entry = chart(container, key, title);
  entry.value.textContent = text;
  const old = entry.box.querySelector("svg");
  const svg = sparkline(values, title, 260, 48);
  if (old) old.replaceWith(svg); else entry.box.append(svg);
}

function rateCharts(stats, time) {
  const counters = { cpu: stats.cpu_s, vcpu: stats.vcpu_time_s, exits: stats.exits_total,
                     block_read: stats.io.block_read, block_write: stats.io.block_write,
                     net_rx: stats.io.net_rx, net_tx: stats.io.net_tx };
  const r = rates.update("vm", time, counters);
  const pct = (key) => rates.values("vm/" + key).map((v) => v * 100);
  const show = (value, unit, digits) => value === null ? "-" : `${fmtNumber(value, digits)}${unit}`;
  plot("charts", "cpu", "CPU (VMM process, % of a core)", pct("cpu"), show(r.cpu === null ? null : r.cpu * 100, " %"));
  plot("charts", "vcpu", "vCPU time (% of a core)", pct("vcpu"), show(r.vcpu === null ? null : r.vcpu * 100, " %"));
  plot("charts", "exits", "VM exits per second", rates.values("vm/exits"), show(r.exits, "/s", 0));
  for (const [key, title] of [["block_read", "Disk read"], ["block_write", "Disk write"],
                              ["net_rx", "Network received"], ["net_tx", "Network sent"]]) {
    plot("charts", key, `${title} (bytes/s)`, rates.values("vm/" + key), r[key] === null ? "-" : `${fmtBytes(r[key])}/s`);
  }
  const reasons = rates.update("exit", time, stats.exits || {});
  for (const reason of Object.keys(stats.exits || {}).sort()) {
    plot("exit-charts", "exit-" + reason, reason, rates.values("exit/" + reason), show(reasons[reason], "/s", 0));
  }
}

// Guest memory: every byte figure the VM reports (a balloon's, merged pages... where the VM has them).
function memoryCharts(stats, virtioMem) {
  const figures = [];
  const walk = (prefix, object) => {
    for (const [key, value] of Object.entries(object || {})) {
      if (typeof value === "number" && /bytes|_mib|pages/.test(key)) figures.push([prefix + key, value]);
      else if (value && typeof value === "object" && !Array.isArray(value)) walk(`${prefix}${key}.`, value);
    }
  };
  walk("", stats.memory);
  if (stats.balloon) walk("balloon.", stats.balloon);
  if (virtioMem) walk("virtio-mem ", { plugged_size_mib: virtioMem.plugged_size_mib,
                                       requested_size_mib: virtioMem.requested_size_mib });
  for (const [key, value] of figures) {
    const series = "mem/" + key;
    rates.push(series, value);
    const text = /bytes/.test(key) ? fmtBytes(value) : /_mib/.test(key) ? `${value} MiB` : String(value);
    plot("charts", series, `Memory: ${key.replace(/_/g, " ")}`, rates.values(series), text);
  }
}

function renderSummary(vm) {
  const state = document.getElementById("state");
  state.textContent = vm.state;
  state.className = stateClass(vm.state);
  document.getElementById("s-state").textContent = vm.state;
  document.getElementById("s-vcpus").textContent = vm.vcpus ?? "-";
  document.getElementById("s-memory").textContent = vm.memory_mib ? `${vm.memory_mib} MiB` : "-";
  document.getElementById("s-accel").textContent = (vm.stats && vm.stats.accel) || "-";
  document.getElementById("s-uptime").textContent = vm.active ? fmtDuration(vm.uptime_s) : "-";
  document.getElementById("s-pid").textContent = vm.pid ?? "-";
  document.getElementById("s-outcome").textContent = vm.outcome ? `${vm.outcome.reason}: ${vm.outcome.message}` : "-";
  if (seenState !== vm.state) {   // a change of state seen by this page (from here or elsewhere)
    if (seenState !== undefined) logEvent(Date.now() / 1000, `${seenState} -> ${vm.state}`);
    seenState = vm.state;
  }
  if (shown.state !== vm.state) {  // buttons are rebuilt only when what they can do changes
    shown.state = vm.state;
    document.getElementById("actions").replaceChildren(actionButtons(NAME, vm.state, (action) => {
      shown.state = null;
      if (action === "delete") location.assign("/");
      else refresh();
    }));
  }
}

function logEvent(time, text) {
  if (events.some((e) => e.text === text && Math.abs((e.time || 0) - (time || 0)) < 2)) return;
  events.push({ time, text });
  events.sort((a, b) => (a.time || 0) - (b.time || 0));
  document.getElementById("events").replaceChildren(
    ...events.map((e) => el("li", {}, el("time", { text: fmtTime(e.time) }), ` ${e.text}`)));
}

function renderSnapshots(list, state) {
  const key = JSON.stringify(list) + state;
  if (key === shown.snapshots) return;
  shown.snapshots = key;
  document.getElementById("no-snapshots").hidden = list.length > 0;
  document.querySelector("#snapshots tbody").replaceChildren(...list.map((s) => el("tr", { "data-snapshot": s.label },
    el("th", { scope: "row", text: s.label }), el("td", { text: new Date(s.taken_at * 1000).toLocaleString() }),
    el("td", { class: "num", text: fmtBytes(s.bytes) }),
    el("td", {}, snapshotButton(s.label, "restore", "Restore"), snapshotButton(s.label, "delete", "Delete")))));
}

function snapshotButton(label, what, text) {
  return el("button", { type: "button", "data-action": what, "aria-label": `${text} snapshot ${label}`,
    class: what === "delete" ? "danger" : null, text, onclick: async () => {
      const question = what === "restore" ? `Restore ${NAME} to snapshot ${label}? A running VM is stopped first.`
                                          : `Delete snapshot ${label}?`;
      if ((await ask(question, false)) === null) return;
      announce(`${what} snapshot ${label}...`);
      const result = what === "restore" ? await api("POST", `${PATH}/snapshots/${encodeURIComponent(label)}/restore`, {})
                                        : await api("DELETE", `${PATH}/snapshots/${encodeURIComponent(label)}`);
      announce(result.ok ? `snapshot ${label}: ${what} done` : `snapshot ${label}: ${result.data && result.data.error}`,
               !result.ok);
      if (result.ok) logEvent(Date.now() / 1000, `snapshot ${label}: ${what}`);
      refresh();
    } });
}

// "ports 0x3f8+8, gsis 4": address ranges in hex, empty ones left out
function describeResources(resources) {
  const hex = (n) => "0x" + Number(n).toString(16);
  const parts = [];
  for (const [key, value] of Object.entries(resources)) {
    if (value === null || value === undefined || (Array.isArray(value) && !value.length)) continue;
    if (Array.isArray(value) && Array.isArray(value[0])) {
      parts.push(`${key} ${value.map(([base, size]) => `${hex(base)}+${size}`).join(" ")}`);
    } else {
      parts.push(`${key} ${Array.isArray(value) ? value.join(" ") : value}`);
    }
  }
  return parts.join(", ");
}

function renderDevices(nodes) {
  const key = JSON.stringify(nodes);
  if (key === shown.devices) return;
  shown.devices = key;
  const container = document.getElementById("devices");
  if (!nodes) { container.replaceChildren(el("p", { class: "hint", text: "Shown while the VM runs." })); return; }
  const ids = new Set(nodes.map((n) => n.id));
  const children = new Map();   // parent id -> nodes; roots (no parent, or one not in the tree) under ""
  for (const node of nodes) {
    const parent = node.parent && ids.has(node.parent) ? node.parent : "";
    if (!children.has(parent)) children.set(parent, []);
    children.get(parent).push(node);
  }
  const tree = (parent, depth) => {
    const list = el("ul", { class: depth ? "tree" : "tree root", "aria-label": depth ? null : "Device tree" });
    for (const node of children.get(parent) || []) {
      const resources = describeResources(node.resources || {});
      const item = el("li", { "data-device": node.id },
        el("strong", { text: node.id }), ` ${node.kind || ""}${node.transport ? ` (${node.transport})` : ""}`,
        resources ? el("span", { class: "hint", text: ` ${resources}` }) : null);
      if (children.has(node.id)) item.append(tree(node.id, depth + 1));
      list.append(item);
    }
    return list;
  };
  container.replaceChildren(tree("", 0));
}

function renderText(id, text, key) {
  if (shown[key] === text) return;
  shown[key] = text;
  document.getElementById(id).textContent = text || "-";
}

async function refresh() {
  clearTimeout(timer);
  const result = await api("GET", PATH);
  if (result.ok) {
    const vm = result.data;
    renderSummary(vm);
    if (vm.stats) { rateCharts(vm.stats, vm.time); memoryCharts(vm.stats, vm.virtio_mem); }
    else rates.forget("vm");
    renderSnapshots(vm.snapshots, vm.state);
    renderDevices(vm.devices);
    renderText("definition", vm.definition, "definition");
    renderText("config", vm.config ? JSON.stringify(vm.config, null, 2) : null, "config");
    for (const e of vm.events) logEvent(e.time, e.text);
    if (window.renderControls) window.renderControls(vm);
  } else {
    announce(result.status === 404 ? `${NAME} is gone (undefined)` : `could not read ${NAME}: ${result.data && result.data.error}`,
             true);
  }
  timer = setTimeout(refresh, POLL_MS);
}

document.getElementById("take-snapshot").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = document.getElementById("snapshot-label");
  const label = input.value.trim();
  announce(`taking snapshot ${label}...`);
  const result = await api("POST", `${PATH}/snapshots`, { label });
  announce(result.ok ? `snapshot ${label} taken` : `snapshot not taken: ${result.data && result.data.error}`, !result.ok);
  if (result.ok) { input.value = ""; logEvent(Date.now() / 1000, `snapshot ${label} taken`); }
  refresh();
});

let timer = null;
refresh();
