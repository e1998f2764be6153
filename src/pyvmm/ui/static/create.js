// The Create form: sent to the server, which checks it as the API does; errors go next to their field.
"use strict";

const form = document.getElementById("create");
const KERNEL_FIELDS = ["kernel", "initrd", "append"];

function syncSource() {
  const own = form.elements.source.value === "kernel";
  for (const id of KERNEL_FIELDS) document.getElementById(id).disabled = !own;
  document.getElementById("kernel_args").disabled = own;
}

function clearErrors() {
  for (const node of form.querySelectorAll(".error")) node.textContent = "";
  for (const node of form.querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
}

function showError(field, message) {
  const slot = document.getElementById(`${field}-error`) || document.getElementById("name-error");
  slot.textContent = message;
  const input = document.getElementById(field) || form.querySelector(`[name="${field}"]`);
  if (input) {
    input.setAttribute("aria-invalid", "true");
    input.focus();
  }
  announce(`Not created: ${field}: ${message}`, true);
}

form.addEventListener("change", (event) => { if (event.target.name === "source") syncSource(); });
form.addEventListener("submit", async (event) => {
  event.preventDefault();
  clearErrors();
  const fields = {};
  for (const element of form.elements) {
    if (!element.name || element.disabled) continue;
    if (element.type === "radio" && !element.checked) continue;
    if (element.type === "checkbox") { if (element.checked) fields[element.name] = "on"; continue; }
    if (element.value !== "" || ["name", "vcpus", "memory"].includes(element.name)) fields[element.name] = element.value;
  }
  const submit = document.getElementById("submit");
  submit.disabled = true;
  announce(`creating ${fields.name}...`);
  const result = await api("POST", "/vms", fields);
  submit.disabled = false;
  if (result.ok) {
    announce(`${result.data.name} created: ${result.data.state}`);
    location.assign(`/vm/${encodeURIComponent(result.data.name)}`);
  } else if (result.data && result.data.field) {
    showError(result.data.field, result.data.error);
  } else {
    announce(`Not created: ${(result.data && result.data.error) || "the server did not answer"}`, true);
  }
});
syncSource();
