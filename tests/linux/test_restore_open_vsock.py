"""A default Linux guest saved while a host program holds a vsock connection to its agent, then
restored: the host end went with the old VM, so the restore resets that connection (an RST on
the receive queue, with its interrupt) and the agent answers the next client. The interrupt used
to be lost (the transport restored its vectors after the device), and with EVENT_IDX the receive
queue never interrupted the guest again: no answer over vsock (seen as a flake in
test_identity.py when the agent client's last connection was still closing at the pause)."""

from __future__ import annotations

import socket

from pyvmm.agent import AgentClient
from pyvmm.config import MachineConfig, VsockConfig
from pyvmm.restore import restore_vm
from test_identity import copy_of

AGENT_PORT = 52


def test_a_connection_open_at_the_save_is_reset_and_the_agent_answers_after_a_restore(pyvmm, tmp_path):
    uds = str(tmp_path / "vsock")
    guest = pyvmm.in_process(MachineConfig(vsock=VsockConfig(cid=3, uds=uds)),
                             ["sh", "-c", "echo guest-ready; sleep 100000"])
    guest.vm.start()
    guest.wait_for(b"guest-ready")
    assert AgentClient(uds, connect_timeout=120).exec(["true"]).status == 0
    held = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    held.settimeout(30)
    held.connect(uds)
    held.sendall(b"CONNECT %d\n" % AGENT_PORT)
    assert held.recv(64).startswith(b"OK ")                   # established with the guest's agent
    guest.vm.pause()
    state = guest.vm.save()
    saved = state.devices["virtio-vsock"].device
    assert saved.connections                      # ours (and maybe the first client's, still closing)
    memory = copy_of(guest.vm.memory)
    guest.vm.close()
    held.close()
    try:
        vm = guest.vm = restore_vm(state, copy_of(memory), guest.console_write)
        vm.symbols = guest.symbols
        try:
            vm.resume()
            assert AgentClient(uds, connect_timeout=60).exec(["echo", "answered"]).stdout == b"answered\n"
            assert vm.device_manager.device("virtio-vsock").counters()["rst_sent"] > saved.stats.get("rst_sent", 0)
        finally:
            vm.close()
    finally:
        memory.close()
    guest.check_kernel_warnings()
