// The VM page's controls for what the VM's API offers: vCPUs, the balloon's target, virtio-mem,
// and disks and NICs plugged in or out of the running VM. Shown only when the VM's API (its OpenAPI document) has
// the operation and the VM the device; the server checks the same again.
"use strict";

let controlsKey = null;

async function control(name, method, path, body, what) {
  announce(`${what}...`);
  const result = await api("POST", `/vms/${encodeURIComponent(name)}/control`, { method, path, body });
  const message = result.ok ? `${what}: done` : `${what}: ${(result.data && result.data.error) || "failed"}`;
  announce(message, !result.ok);
  const slot = document.getElementById("control-status");
  if (slot) { slot.textContent = message; slot.classList.toggle("error", !result.ok); }
  if (result.ok) logEvent(Date.now() / 1000, what);   // vm.js's event log
  return result.ok;
}

function labelled(id, text, input) {
  input.id = id;
  return el("span", { class: "control-field" }, el("label", { for: id, text }), " ", input);
}

function balloonForm(vm) {
  const target = el("input", { type: "number", min: "0", max: String(vm.memory_mib || 0), required: true,
                               value: String(vm.config.balloon.amount_mib ?? 0) });
  const form = el("form", { id: "balloon-form" },
    el("h3", { text: "Balloon" }),
    labelled("balloon-target", "Target (MiB taken back from the guest)", target), " ",
    el("button", { type: "submit", text: "Set the target" }));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    await control(NAME, "PATCH", "/balloon", { amount_mib: Number(target.value) }, `balloon target ${target.value} MiB`);
  });
  return form;
}

function vcpuText(now) { return `${now.count} of at most ${now.max}`; }

function virtioMemText(status, block) {
  return `plugged ${status.plugged_size_mib ?? "?"} MiB of a ${status.region_size_mib ?? "?"} MiB region ` +
         `(asked: ${status.requested_size_mib ?? "?"} MiB, blocks of ${block} MiB)`;
}

// The figures that change while a form stays (vCPU count, memory plugged), updated in place.
function updateStatus(vm) {
  const vcpus = document.getElementById("vcpus-status");
  if (vcpus && vm.vcpu_hotplug) vcpus.textContent = vcpuText(vm.vcpu_hotplug);
  const memory = document.getElementById("virtio-mem-status");
  if (memory && vm.virtio_mem) memory.textContent = virtioMemText(vm.virtio_mem, vm.virtio_mem.block_size_mib || 1);
}

function vcpuForm(vm) {
  const now = vm.vcpu_hotplug;
  const count = el("input", { type: "number", min: "1", max: String(now.max), required: true, value: String(now.count) });
  const form = el("form", { id: "vcpus-form" },
    el("h3", { text: "vCPUs" }),
    el("p", { id: "vcpus-status", text: vcpuText(now) }),
    labelled("vcpus-count", "vCPUs", count), " ", el("button", { type: "submit", text: "Set" }));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    await control(NAME, "PUT", "/pyvmm/vcpus", { count: Number(count.value) }, `${count.value} vCPUs`);
  });
  return form;
}

function virtioMemForm(vm) {
  const status = vm.virtio_mem || {};
  const block = status.block_size_mib || 1;
  const size = el("input", { type: "number", min: "0", step: String(block), required: true,
                             max: String(status.usable_region_size_mib ?? status.region_size_mib ?? 0),
                             value: String(status.requested_size_mib ?? 0) });
  const form = el("form", { id: "virtio-mem-form" },
    el("h3", { text: "Hotpluggable memory (virtio-mem)" }),
    el("p", { id: "virtio-mem-status", text: virtioMemText(status, block) }),
    labelled("virtio-mem-size", "Plugged size (MiB)", size), " ",
    el("button", { type: "submit", text: "Resize" }));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    await control(NAME, "PUT", "/pyvmm/memory/virtio-mem", { requested_size_mib: Number(size.value) },
                  `virtio-mem size ${size.value} MiB`);
  });
  return form;
}

function deviceTable(caption, rows, columns, detach) {
  return el("table", { class: "devices" }, el("caption", { text: caption }),
    el("thead", {}, el("tr", {}, ...columns.map((c) => el("th", { scope: "col", text: c[0] })), el("th", { scope: "col", text: "" }))),
    el("tbody", {}, ...rows.map((row) => el("tr", { "data-hotplug": row.id },
      ...columns.map((c) => el("td", { text: String(row[c[1]] ?? "-") })),
      el("td", {}, row.fixed ? "" : el("button", { type: "button", class: "danger", "aria-label": `Detach ${row.id}`,
        text: "Detach", onclick: () => detach(row.id) }))))));
}

function diskControls(vm) {
  const drives = (vm.config.drives || []).map((d) => ({ id: d.drive_id, path: d.path_on_host || d.socket,
    ro: d.is_read_only ? "yes" : "no", fixed: d.is_root_device }));
  const id = el("input", { type: "text", required: true, autocomplete: "off" });
  const path = el("input", { type: "text", required: true, autocomplete: "off" });
  const readonly = el("input", { type: "checkbox" });
  const form = el("form", { id: "attach-disk" },
    labelled("attach-disk-id", "Drive id", id), " ", labelled("attach-disk-path", "Image path", path), " ",
    labelled("attach-disk-ro", "Read-only", readonly), " ", el("button", { type: "submit", text: "Attach the disk" }));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    await control(NAME, "PUT", `/drives/${encodeURIComponent(id.value)}`, { drive_id: id.value, path_on_host: path.value,
      is_root_device: false, is_read_only: readonly.checked }, `attach disk ${id.value}`);
  });
  return el("div", {}, el("h3", { text: "Disks" }),
    deviceTable("Drives of the running VM", drives, [["Id", "id"], ["Path", "path"], ["Read-only", "ro"]],
      (drive) => control(NAME, "DELETE", `/drives/${encodeURIComponent(drive)}`, undefined, `detach disk ${drive}`)),
    form);
}

function nicControls(vm) {
  const nics = (vm.config["network-interfaces"] || []).map((n) => ({ id: n.iface_id, tap: n.host_dev_name,
    mac: n.guest_mac }));
  const id = el("input", { type: "text", required: true, autocomplete: "off" });
  const tap = el("input", { type: "text", required: true, autocomplete: "off", value: "auto" });
  const mac = el("input", { type: "text", autocomplete: "off", placeholder: "random" });
  const form = el("form", { id: "attach-nic" },
    labelled("attach-nic-id", "Interface id", id), " ", labelled("attach-nic-tap", "TAP (or auto)", tap), " ",
    labelled("attach-nic-mac", "MAC", mac), " ", el("button", { type: "submit", text: "Attach the NIC" }));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = { iface_id: id.value, host_dev_name: tap.value };
    if (mac.value) body.guest_mac = mac.value;
    await control(NAME, "PUT", `/network-interfaces/${encodeURIComponent(id.value)}`, body, `attach NIC ${id.value}`);
  });
  return el("div", {}, el("h3", { text: "Network interfaces" }),
    deviceTable("NICs of the running VM", nics, [["Id", "id"], ["TAP", "tap"], ["MAC", "mac"]],
      (nic) => control(NAME, "DELETE", `/network-interfaces/${encodeURIComponent(nic)}`, undefined, `detach NIC ${nic}`)),
    form);
}

window.renderControls = function renderControls(vm) {
  const caps = vm.capabilities || {};
  const live = (vm.state === "running" || vm.state === "paused") && vm.config;
  // redrawn only when what can be done changes: a poll must not replace a form being used
  const key = JSON.stringify([caps, live ? vm.config : null, Boolean(vm.vcpu_hotplug), Boolean(vm.virtio_mem)]);
  if (key === controlsKey) {
    updateStatus(vm);
    return;
  }
  controlsKey = key;
  const section = document.getElementById("controls");
  const parts = [];
  if (live && caps.balloon) parts.push(balloonForm(vm));
  if (live && caps.vcpus && vm.vcpu_hotplug && vm.vcpu_hotplug.max > 1) parts.push(vcpuForm(vm));
  if (live && caps.virtio_mem) parts.push(virtioMemForm(vm));
  if (live && caps.disk_hotplug) parts.push(diskControls(vm));
  if (live && caps.nic_hotplug) parts.push(nicControls(vm));
  section.hidden = parts.length === 0;
  document.getElementById("control-forms").replaceChildren(...parts);
};
