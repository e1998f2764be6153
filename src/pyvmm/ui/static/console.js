// The serial console: xterm.js over a WebSocket to the VM's console (history first, then live).
"use strict";

const NAME = decodeURIComponent(location.pathname.split("/")[2]);
const REPLAY_BYTES = 256 * 1024;
document.title = `Console of ${NAME} - pyvmm`;
document.getElementById("title").textContent = `Console of ${NAME}`;
document.getElementById("back").href = `/vm/${encodeURIComponent(NAME)}`;
document.getElementById("back").textContent = `Back to ${NAME}`;

const term = new Terminal({ cols: 100, rows: 30, scrollback: 5000, convertEol: false, cursorBlink: true,
                            screenReaderMode: false, fontSize: 14 });
term.open(document.getElementById("terminal"));
const reconnect = document.getElementById("reconnect");
let socket = null;

function connect() {
  reconnect.disabled = true;
  term.reset();
  const url = `ws://${location.host}/api/vms/${encodeURIComponent(NAME)}/console` +
              `?replay=${REPLAY_BYTES}&token=${encodeURIComponent(TOKEN)}`;
  socket = new WebSocket(url);
  socket.binaryType = "arraybuffer";
  let opened = false;
  socket.addEventListener("open", () => { opened = true; announce(`attached to ${NAME}'s console`); term.focus(); });
  socket.addEventListener("message", (event) => {
    term.write(typeof event.data === "string" ? event.data : new Uint8Array(event.data));
  });
  socket.addEventListener("close", () => {
    reconnect.disabled = false;
    setTimeout(() => watchForRestart(opened), opened ? 500 : 2000);
  });
}

// Detached (the VM stopped, rebooted into a new process, was restored) or refused: say why, and
// attach again by itself whenever the VM runs; the Reconnect button does it at once.
async function watchForRestart(wasAttached) {
  const result = await api("GET", `/vms/${encodeURIComponent(NAME)}`);
  if (socket && socket.readyState !== WebSocket.CLOSED) return;   // reconnected meanwhile
  const state = result.ok ? result.data.state : null;
  if (state === "running" || state === "paused") {
    if (!wasAttached) announce("could not attach to the console; trying again", true);
    connect();
    return;
  }
  const why = result.ok ? `the VM is ${state}` : (result.data && result.data.error) || "the server is gone";
  announce(`detached from the console (${why}); it attaches again when the VM runs`, true);
  setTimeout(() => watchForRestart(true), 2000);
}

term.onData((data) => {
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(data);
});
reconnect.addEventListener("click", connect);
document.getElementById("history").addEventListener("click", async () => {
  const response = await fetch(`/api/vms/${encodeURIComponent(NAME)}/history`, { headers: { "X-Pyvmm-Token": TOKEN } });
  if (!response.ok) { announce("no history to download", true); return; }
  const blob = await response.blob();
  const link = el("a", { href: URL.createObjectURL(blob), download: `${NAME}-console.log` });
  document.body.append(link);
  link.click();
  link.remove();
});
connect();
