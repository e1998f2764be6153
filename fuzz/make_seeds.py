#!/usr/bin/env python3
"""Write the seed inputs of fuzz/corpus/NAME (committed; run again after changing a harness's
input layout). Kernel images come from the unit tests' generators (tests/unit/imagegen*.py),
the state file from a tiny VM on the software CPU, the rest is laid out for each harness's
Reader: valid rings with a plausible request in each queue, so fuzzing starts past the checks."""

from __future__ import annotations

import shutil
import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests" / "unit")]

QUEUE_SIZE_INDEX = 4          # guest.program_queue: 16 entries


def u(value: int, size: int) -> bytes:
    return value.to_bytes(size, "little")


def rings(queues: int, *, readable: int = 16, writable: int = 513, header: bytes = bytes(16),
          between: bytes | None = None, features: bool = True) -> bytes:
    """program_queue() for each queue, 48 steps kicking each queue in turn, then RAM windows:
    each queue's descriptor table (one readable, one writable buffer), its available ring with
    that chain published, and the readable buffer's bytes."""
    out = u(0xFFFFFFFF_FFFFFFFF, 8) if features else b""   # features: all offered ones are taken
    layout = []
    for q in range(queues):
        base = 0x1000 + q * 0x3000
        desc, avail, used, buf = base, base + 0x1000, base + 0x1800, base + 0x2000
        layout.append((desc, avail, used, buf))
        out += u(QUEUE_SIZE_INDEX, 1) + b"".join(u(0x80, 1) + u(a, 4) for a in (desc, avail, used)) + u(1, 1)
    out += bytes((i % queues) << 3 for i in range(48)) if between is None else between
    windows = []
    for desc, avail, used, buf in layout:
        table = struct.pack("<QIHH", buf, readable, 1, 1) + struct.pack("<QIHH", buf + 0x400, writable, 2, 0)
        windows += [(desc, table), (avail, struct.pack("<HHH", 0, 1, 0)), (buf, header.ljust(readable, b"\0"))]
    out += u(len(windows) - 1, 1)
    for address, chunk in windows:
        out += u(address, 4) + u(len(chunk) - 1, 2) + chunk
    return out


def device_seeds() -> dict[str, list[bytes]]:
    blk_prefix = u(0, 1) + u(0, 1) + u(2, 1) + u(0, 1)          # no limit, writable, queue size 16, 1 queue
    limited = u(1, 1) + u(4096, 2) + u(100, 1) + u(0, 1) + u(2, 1) + u(0, 1)
    net_prefix = u(0, 1) + u(1, 1)                               # no limit, queue size 16
    return {
        "virtio-blk": [blk_prefix + rings(1, header=struct.pack("<IIQ", 0, 0, 1)),
                       blk_prefix + rings(1, readable=16 + 512, header=struct.pack("<IIQ", 1, 0, 2)),
                       limited + rings(1, header=struct.pack("<IIQ", 4, 0, 0))],
        "virtio-net": [net_prefix + rings(2, readable=12 + 60), u(1, 1) + u(3, 1) + u(5, 1) + u(1, 1) + rings(2)],
        "virtio-vsock": [u(0, 1) + u(1, 1) + rings(3, readable=44)],
        "virtio-console": [u(1, 1) + u(1, 1) + u(80, 1) + u(25, 1) + rings(6, readable=8)],
        "virtio-rng": [rings(1, readable=0)],
        "virtio-balloon": [u(1000, 2) + u(1, 1) + u(1, 1) + u(1, 1) + rings(4, readable=16)],
        "virtqueue": [rings(1, features=False, between=b"\0\0" + bytes(64)),
                      rings(1, features=False, between=b"\1\1" + bytes(range(64)))],
    }


def transport_seeds() -> dict[str, list[bytes]]:
    # mmio: select queue 0, set its size, addresses, ready, status; the ops are (kind, offset, size, value)
    def op(kind: int, offset: int, size_index: int, value: int) -> bytes:
        return u(kind, 1) + u(offset, 2) + u(size_index, 1) + u(value, 4 if kind & 2 else 8)
    mmio_ops = b"".join(op(2, offset, 2, value) for offset, value in (
        (0x070, 1), (0x070, 3), (0x030, 0), (0x038, 16), (0x080, 0x1000), (0x090, 0x2000), (0x0A0, 0x3000),
        (0x044, 1), (0x070, 11), (0x070, 15), (0x050, 0))) + op(1, 0x060, 2, 0) + op(1, 0x100, 0, 0)
    mmio_ops = mmio_ops[:len(mmio_ops) // 4 * 4]
    mmio = u(len(mmio_ops) // 4, 1) + mmio_ops + u(0, 1)
    pci_ops = b"".join(u(kind, 1) + u(size_index, 1) + u(value, 4 if kind & 8 else 8) + u(offset, 2)
                       for kind, size_index, value, offset in ((0x0B, 2, 0, 0x00), (0xA8, 0, 1, 0x14),
                                                               (0xA9, 2, 0, 0x00), (0x09, 2, 0, 0x34)))
    pci_ops = pci_ops[:len(pci_ops) // 4 * 4]
    return {"virtio-mmio": [mmio], "virtio-pci": [u(len(pci_ops) // 4, 1) + pci_ops + u(0, 1)]}


def loader_seeds() -> dict[str, list[bytes]]:
    import imagegen
    import imagegen_linux

    code = b"\xfa\xf4"
    return {
        "elf": [imagegen.elf32([imagegen.Seg(0x100000, code)], 0x100000),
                imagegen.elf64([imagegen.Seg(0x200000, code, memsz=0x3000)], 0x200000)],
        "multiboot": [imagegen.multiboot_elf(code), imagegen.aout_image(0x100000, code, bss=0x1000)],
        "bzimage": [imagegen_linux.bzimage(imagegen_linux.small_vmlinux(), "gzip")],
        "pvh": [imagegen_linux.small_vmlinux()],
    }


def state_seeds() -> dict[str, list[bytes]]:
    import tempfile

    from pyvmm.accel.select import choose_accelerator
    from pyvmm.builder import build_vm
    from pyvmm.config import MachineConfig
    from pyvmm.snapshot.state_file import HEADER_SIZE, encode_state

    with tempfile.TemporaryDirectory() as scratch:
        kernel = Path(scratch) / "flat.bin"
        kernel.write_bytes(b"\xfa\xf4")
        config = MachineConfig(kernel=str(kernel), flat_address=0x100000, memory=16 << 20, rng="mmio")
        vm = build_vm(config, lambda data: None, accel=choose_accelerator("tcg").create())
        try:
            vm.pause()
            blob = encode_state(vm.save(), vm_config={"machine-config": {"vcpu_count": 1, "mem_size_mib": 16}})
        finally:
            vm.close()
    return {"state-file": [blob, b"J" + blob[HEADER_SIZE:]]}


def api_seeds() -> dict[str, list[bytes]]:
    def request(method: str, path: str, body: str | None = None) -> bytes:
        head = f"{method} {path} HTTP/1.1\nHost: x\n"
        if body is None:
            return (head + "\n").encode()
        return (head + f"Content-Type: application/json\nContent-Length: {len(body)}\n\n{body}").encode()
    sep = b"\n\n\n"
    return {"api": [
        request("GET", "/"),
        request("PUT", "/machine-config", '{"vcpu_count": 2, "mem_size_mib": 256}'),
        request("PUT", "/drives/d0", '{"drive_id": "d0", "is_root_device": false, "path_on_host": "/dev/null", '
                                     '"rate_limiter": {"bandwidth": {"size": 1048576, "refill_time": 1000}}}') + sep +
        request("PATCH", "/drives/d0", '{"drive_id": "d0", "rate_limiter": {"ops": {"size": 10, "refill_time": 100}}}'),
        request("PUT", "/network-interfaces/eth0", '{"iface_id": "eth0", "host_dev_name": "tap0", '
                                                   '"rx_rate_limiter": {"ops": {"size": 5, "refill_time": 10}}}') + sep +
        request("PATCH", "/network-interfaces/eth0", '{"iface_id": "eth0", "tx_rate_limiter": null}'),
        request("PUT", "/snapshot/load", '{"snapshot_path": "s", "mem_backend": {"backend_type": "File", '
                                         '"backend_path": "m"}}'),
        request("PUT", "/actions", '{"action_type": "InstanceStart"}'),
        request("GET", "/pyvmm/console?tail=10"),
        request("PUT", "/pyvmm/agent/exec", '{"argv": ["true"], "stdin": "aGk="}'),
    ]}


def main() -> None:
    seeds = {**device_seeds(), **transport_seeds(), **loader_seeds(), **state_seeds(), **api_seeds()}
    for name, inputs in seeds.items():
        directory = HERE / "corpus" / name
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        for index, data in enumerate(inputs):
            (directory / f"seed-{index}").write_bytes(data)
        print(f"{name}: {len(inputs)} seeds, {sum(map(len, inputs))} bytes")


if __name__ == "__main__":
    main()
