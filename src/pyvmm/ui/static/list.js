// The VM list: polled every two seconds, rows updated in place (focus stays where it was).
"use strict";

const rates = new Rates(60);
const rows = new Map();      // name -> {row, cells, state}
const POLL_MS = 2000;

function buildRow(name) {
  const cells = {};
  const row = el("tr", { "data-vm": name });
  const link = el("a", { href: `/vm/${encodeURIComponent(name)}`, text: name });
  row.append(el("th", { scope: "row" }, link));
  for (const key of ["state", "vcpus", "memory", "accel", "uptime", "cpu", "exits", "actions"]) {
    cells[key] = el("td", { class: ["vcpus", "memory", "uptime"].includes(key) ? "num" : key });
    row.append(cells[key]);
  }
  return { row, cells, state: null };
}

function graphCell(cell, values, text, label) {
  cell.replaceChildren(el("span", { class: "spark" }, sparkline(values, label, 90, 22), el("span", { class: "num", text })));
}

function render(listing) {
  const body = document.querySelector("#vms tbody");
  const seen = new Set();
  for (const vm of listing.vms) {
    seen.add(vm.name);
    let entry = rows.get(vm.name);
    if (!entry) {
      entry = buildRow(vm.name);
      rows.set(vm.name, entry);
    }
    body.append(entry.row);   // keeps the server's order (by name); moving a row keeps its focus
    const c = entry.cells;
    c.state.textContent = vm.state;
    c.state.className = stateClass(vm.state);
    c.vcpus.textContent = vm.vcpus ?? "-";
    c.memory.textContent = vm.memory_mib ? `${vm.memory_mib} MiB` : "-";
    c.accel.textContent = (vm.stats && vm.stats.accel) || "-";
    c.uptime.textContent = vm.active ? fmtDuration(vm.uptime_s) : "-";
    if (vm.stats) {
      const r = rates.update(vm.name, listing.time, { cpu: vm.stats.cpu_s, exits: vm.stats.exits_total });
      graphCell(c.cpu, rates.values(vm.name + "/cpu").map((v) => v * 100), r.cpu === null ? "-" : fmtNumber(r.cpu * 100),
                `CPU % of ${vm.name}`);
      graphCell(c.exits, rates.values(vm.name + "/exits"), r.exits === null ? "-" : fmtNumber(r.exits, 0),
                `VM exits per second of ${vm.name}`);
    } else {
      rates.forget(vm.name);
      c.cpu.textContent = "-";
      c.exits.textContent = "-";
    }
    if (entry.state !== vm.state) {   // buttons are rebuilt only when what they can do changes
      entry.state = vm.state;
      c.actions.replaceChildren(actionButtons(vm.name, vm.state, () => { entry.state = null; refresh(); }),
        el("a", { href: `/vm/${encodeURIComponent(vm.name)}/console`, "aria-label": `Console of ${vm.name}`,
                  text: "Console" }));
    }
  }
  for (const [name, entry] of rows) {
    if (!seen.has(name)) { entry.row.remove(); rows.delete(name); rates.forget(name); }
  }
  document.getElementById("empty").hidden = listing.vms.length > 0;
}

let timer = null;
async function refresh() {
  clearTimeout(timer);
  const result = await api("GET", "/vms");
  if (result.ok) render(result.data);
  else announce(`could not list the VMs: ${result.data && result.data.error}`, true);
  timer = setTimeout(refresh, POLL_MS);
}

refresh();
