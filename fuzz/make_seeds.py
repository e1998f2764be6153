#!/usr/bin/env python3
"""Write the seed inputs of fuzz/corpus/NAME (committed; run again after changing a harness's
input layout). Kernel images come from the unit tests' generators (tests/unit/imagegen*.py),
the state file from a tiny VM on the software CPU, the rest is laid out for each harness's
Reader: valid rings with a plausible request in each queue, so fuzzing starts past the checks."""

from __future__ import annotations

import json
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
        # (at most 4 KiB of the readable buffer's bytes: RAM starts zeroed, and a window's length is 16 bits)
        windows += [(desc, table), (avail, struct.pack("<HHH", 0, 1, 0)), (buf, header.ljust(min(readable, 4096), b"\0"))]
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
                       limited + rings(1, header=struct.pack("<IIQ", 4, 0, 0)),
                       # a 128 KiB read and a 128 KiB write: the transfer threads' path, a kick
                       # then a host step (which ends the transfers) then kicks again
                       blk_prefix + rings(1, writable=(128 << 10) + 1, header=struct.pack("<IIQ", 0, 0, 8),
                                          between=bytes([0, 6] + [0] * 46)),
                       blk_prefix + rings(1, readable=16 + (128 << 10), writable=1,
                                          header=struct.pack("<IIQ", 1, 0, 16), between=bytes([0, 6] + [0] * 46))],
        "virtio-net": [net_prefix + rings(2, readable=12 + 60), u(1, 1) + u(3, 1) + u(5, 1) + u(1, 1) + rings(2)],
        "virtio-vsock": [u(0, 1) + u(1, 1) + rings(3, readable=44)],
        "virtio-console": [u(1, 1) + u(1, 1) + u(80, 1) + u(25, 1) + rings(6, readable=8)],
        "virtio-rng": [rings(1, readable=0)],
        "virtio-balloon": [u(1000, 2) + u(1, 1) + u(1, 1) + u(1, 1) + rings(4, readable=16)],
        # event_idx, want, max_pieces, then the plan: lend, send, serve, take back, lend, send, serve
        "net-rx-thread": [rings(1, features=False, readable=0, writable=4096,
                                between=b"\1\2\2" + bytes([1, 1 << 2, 2, 3, 1, 2 << 2, 2, 2]).ljust(32, b"\0")),
                          rings(1, features=False, readable=0, writable=64,
                                between=b"\0\3\3" + bytes([1, 9 << 2, 2, 2, 3, 1, 2]).ljust(32, b"\0"))],
        "virtqueue": [rings(1, features=False, between=b"\0\0" + bytes(64)),
                      rings(1, features=False, between=b"\1\1" + bytes(range(64)))],
    }


def net_tx_thread_seeds() -> dict[str, list[bytes]]:
    """harnesses/net_tx_thread.py: a transmit ring (16 entries; 1, 128 and 256 in some, rings
    overlapping in one), two RAM windows of frame bytes, then the operations: the driver adding
    chains, lend (start), kick and pump, take, take back (stop), Python serving, the socket filled."""
    desc, avail, used = 0x1000, 0x2000, 0x2800

    def ring(event_idx=0, indirect=0, header=0, max_frame=0, max_pieces=0, backend=0, size=QUEUE_SIZE_INDEX,
             rings=(desc, avail, used)):
        # program_queue, the features, the choices (harness's HEADERS, MAX_FRAMES, MAX_PIECES, SNDBUFS),
        # then two RAM windows of distinct bytes at 0x4000 and 0x8000 (what the chains' buffers hold)
        out = u(size, 1) + b"".join(u(0x80, 1) + u(a, 4) for a in rings) + u(1, 1)
        out += bytes([event_idx, indirect, header, max_frame, max_pieces, backend])
        windows = [(0x4000, bytes(range(256)) * 16), (0x8000, bytes(range(255, -1, -1)) * 8)]
        out += u(len(windows) - 1, 1)
        return out + b"".join(u(a, 4) + u(len(chunk) - 1, 2) + chunk for a, chunk in windows)

    def chain(head, pieces, *, indirect_table=None, writable=None, onward=None, outside=None, raw=None,
              bad_head=None):
        """(harness's write_chain) pieces: (address, length) each, at most 4; onward: the last one's
        next (below 0x80: one of the chain's, a loop)."""
        kind = (len(pieces) - 1) | (4 if indirect_table is not None else 0) | (8 if writable is not None else 0) \
            | (0x10 if onward is not None else 0) | (0x20 if outside is not None else 0) \
            | (0x40 if raw is not None else 0) | (0x80 if bad_head is not None else 0)
        out = u(kind, 1) + u(head, 1)
        out += b"".join(u(v, 1) for v in (bad_head, writable, outside) if v is not None)
        out += u(raw[0], 1) if raw is not None else b""
        out += u(onward, 1) if onward is not None else b""
        out += b"".join(u(a, 4) + u(n if n < 0x800 else 0x8000 | n, 2) for a, n in pieces)
        if indirect_table is not None:
            out += u(indirect_table, 4) + (u(raw[1], 2) if raw is not None else b"")
        return out

    def add(*chains, jump=None):
        return u((len(chains) - 1) << 3 | (0x80 if jump is not None else 0), 1) + b"".join(chains) \
            + (u(jump, 1) if jump is not None else b"")

    start, pump, take, stop = b"\1", b"\2", b"\3", b"\4"

    def python(count, hold=False):
        return u(5 | (count - 1) << 3 | (0x80 if hold else 0), 1)

    def fill(free):
        return u(6 | free << 3, 1)

    def poke(what, value):
        return u(7 | what << 3, 1) + u(value, 2)

    frame = chain(0, [(0x4000, 12), (0x4100, 60)])
    return {"net-tx-thread": [
        # the ring's first chain (none published yet: avail idx 0), lent, served, taken back, lent again
        ring() + add(frame, chain(2, [(0x4200, 100)])) + start + pump + take
        + add(chain(5, [(0x8000, 12 + 1500)])) + pump + stop + python(4) + add(chain(3, [(0x4000, 70)]), frame)
        + start + pump + take + stop,
        # EVENT_IDX and indirect tables; used_event moved; the socket full but for one frame
        ring(event_idx=1, indirect=1) + start + add(chain(1, [(0x4000, 12), (0x4800, 200), (0x8100, 3)],
                                                          indirect_table=0x7000)) + pump
        + poke(0, 5) + add(frame, chain(4, [(0x8000, 400)])) + pump + take + fill(1)
        + add(frame, chain(6, [(0x4010, 64)]), chain(8, [(0x4020, 64)], indirect_table=0x7100), frame) + pump + take
        + stop,
        # what it does not serve: a writable descriptor, a loop, a buffer out of RAM, a bad head
        # (the taken-back queue: VirtqueueBroken)
        ring(event_idx=1) + start + add(frame, chain(4, [(0x4000, 12), (0x4400, 64)], writable=1)) + pump + take
        + python(4) + start + add(chain(7, [(0x4000, 20), (0x4100, 20)], onward=0)) + pump + take + python(2)
        + start + add(frame, chain(9, [(0x4000, 30)], outside=0)) + pump + take + python(2)
        + start + add(frame, chain(0, [(0x4000, 40)], bad_head=3)) + pump + take + python(2),
        # tight limits (no header, 60-byte frames, one piece, a small socket buffer): stops at a chain
        # of two pieces; the NO_INTERRUPT flag; a chain held by Python (no lend); an indirect table
        # not negotiated; the available index jumping
        ring(header=2, max_frame=2, max_pieces=1, backend=1) + poke(1, 1) + start
        + add(chain(1, [(0x4000, 60)]), frame, chain(2, [(0x4000, 61)])) + pump + take + python(2, hold=True)
        + start + python(1) + start + add(chain(3, [(0x8000, 0)]), chain(5, [(0x4000, 1)], raw=(0x14, 16),
                                                                       indirect_table=0x7000)) + pump + take
        + python(2) + start + add(chain(6, [(0x4000, 50)]), jump=30) + pump + take + python(2),
        # a long burst on 128 entries: the interrupt looked at every 64 chains, the socket full on the way
        ring(size=7) + start + b"".join(add(*(chain((4 * k + i) % 128, [(0x4000 + 64 * i, 12 + k)])
                                              for i in range(4))) for k in range(20)) + fill(3) + pump + take + stop,
        # one entry (the used ring wraps at each chain), EVENT_IDX: chains one by one, then a next
        # index outside the table and one inside an indirect table
        ring(size=0, event_idx=1, indirect=1) + start + b"".join(add(chain(0, [(0x4000 + k, 12 + k)])) + pump
                                                                 for k in range(8)) + take
        + add(chain(0, [(0x4000, 12), (0x4100, 12)], onward=0x90)) + pump + take + python(1) + start
        + add(chain(0, [(0x4000, 12), (0x4100, 12)], onward=0x81, indirect_table=0x7000)) + pump + take + python(1),
        # 256 entries, rings that overlap: the used ring over the available ring's end (its used_event
        # in the used elements), frames in the used ring and in the descriptor table
        ring(size=8, event_idx=1, rings=(0x1000, 0x2000, 0x2000 + 6 + 2 * 256 - 0x20 & ~3)) + start
        + add(frame, chain(1, [(0x2000 + 6 + 2 * 256 - 0x20 & ~3, 12 + 64)]), chain(2, [(0x1000, 12), (0x1010, 40)]))
        + pump + take + add(*(chain(3 + i, [(0x21F0, 16 * i + 12)]) for i in range(4))) + pump + take + stop
        + python(8) + start + add(frame, frame) + pump + take + stop,
    ]}


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
    from dataclasses import replace

    from pyvmm.accel.select import choose_accelerator
    from pyvmm.builder import build_vm
    from pyvmm.config import MachineConfig
    from pyvmm.snapshot.state_file import HEADER_SIZE, encode_state

    from pyvmm.config import BalloonConfig, ConsolePort, DiskConfig, RateLimit, VsockConfig
    from pyvmm.devices.rate_limiter import TokenBucketConfig

    blobs = []
    with tempfile.TemporaryDirectory() as scratch:
        kernel = Path(scratch) / "flat.bin"
        kernel.write_bytes(b"\xfa\xf4")
        for disk in ("disk.img", "disk2.img"):
            (Path(scratch) / disk).write_bytes(bytes(1 << 16))
        tiny = MachineConfig(kernel=str(kernel), flat_address=0x100000, memory=16 << 20, rng="mmio")
        # every kind of device state a file can hold, on both transports
        full = replace(tiny, cpus=2, rng="pci", console="virtio", virtio_mem_size=128 << 20,
                       console_ports=(ConsolePort("port0", f"{scratch}/port0.sock"),),
                       disks=(DiskConfig(f"{scratch}/disk.img", rate_limit=RateLimit(TokenBucketConfig(1 << 20, 1000), TokenBucketConfig(100, 1000))),
                              DiskConfig(f"{scratch}/disk2.img", readonly=True, transport="mmio")),
                       vsock=VsockConfig(3, f"{scratch}/vsock.sock"),
                       balloon=BalloonConfig(amount_mib=4, deflate_on_oom=True, stats_interval_s=1,
                                             free_page_reporting=True, transport="mmio"))
        for config in (tiny, full):
            vm = build_vm(config, lambda data: None, accel=choose_accelerator("tcg").create())
            try:
                vm.pause()
                blobs.append(encode_state(vm.save(), vm_config={"machine-config": {"vcpu_count": config.cpus,
                                                                                   "mem_size_mib": 16}}))
            finally:
                vm.close()
    return {"state-file": [blobs[0], b"J" + blobs[0][HEADER_SIZE:], b"J" + blobs[1][HEADER_SIZE:]]}


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
        *api_route_seeds(),
    ]}


def _example(schema: dict, schemas: dict, depth: int = 0):
    """A value of OpenAPI `schema` with every property set: the first enum value, a default, or one of
    the type's (strings name files relative to the harness's scratch directory)."""
    if "$ref" in schema:
        schema = schemas[schema["$ref"].rsplit("/", 1)[1]]
    if "enum" in schema:
        return schema["enum"][0]
    if "default" in schema and schema["default"] is not None:
        return schema["default"]
    kind = schema.get("type", "object")
    kind = kind[0] if isinstance(kind, list) else kind
    if kind == "object":
        properties = schema.get("properties") or {}
        return {} if depth > 3 else {key: _example(value, schemas, depth + 1) for key, value in properties.items()}
    if kind == "array":
        return [_example(schema.get("items") or {"type": "string"}, schemas, depth + 1)]
    return {"string": "x", "integer": 1, "number": 1.5, "boolean": True}.get(kind)


def api_route_seeds() -> list[bytes]:
    """One request per route and method of the API's OpenAPI document, every body field filled in: the
    fuzzer starts inside each resource's field checks instead of having to find its path first."""
    from pyvmm.api.openapi import document

    openapi = document()
    schemas = openapi["components"]["schemas"]
    seeds = []
    for path, methods in sorted(openapi["paths"].items()):
        concrete = path.replace("{drive_id}", "d0").replace("{iface_id}", "eth0")
        for method, operation in sorted(methods.items()):
            head = f"{method.upper()} {concrete} HTTP/1.1\nHost: x\n"
            content = (operation.get("requestBody") or {}).get("content", {}).get("application/json")
            if content is None:
                seeds.append((head + "\n").encode())
                continue
            body = _example(content["schema"], schemas)
            for key in ("drive_id", "iface_id"):
                if isinstance(body, dict) and key in body:
                    body[key] = "d0" if key == "drive_id" else "eth0"
            text = json.dumps(body)
            seeds.append((head + f"Content-Type: application/json\nContent-Length: {len(text)}\n\n{text}").encode())
    return seeds


def api_dictionary() -> list[str]:
    """libFuzzer dictionary entries: methods, path segments, header names and every field name."""
    from pyvmm.api.openapi import document

    openapi = document()
    words = {"GET", "PUT", "PATCH", "DELETE", "HTTP/1.1", "HTTP/1.0", "Content-Length: ", "Content-Type: ",
             "application/json", "Transfer-Encoding: chunked", "Expect: 100-continue", "null", "true", "false"}
    for path in openapi["paths"]:
        words.update(f"/{segment}" for segment in path.strip("/").split("/") if segment and "{" not in segment)
        words.add(path.split("{")[0])
    for schema in openapi["components"]["schemas"].values():
        for key, value in (schema.get("properties") or {}).items():
            words.add(f'"{key}":')
            words.update(f'"{choice}"' for choice in value.get("enum", []) if isinstance(choice, str))
    return sorted(words)


def main() -> None:
    """make_seeds.py [NAME...]: rewrite those harnesses' seeds (default: all), and the dictionaries."""
    makers = (device_seeds, net_tx_thread_seeds, transport_seeds, loader_seeds, state_seeds, api_seeds)
    wanted = set(sys.argv[1:])
    seeds = {name: inputs for make in makers for name, inputs in make().items() if not wanted or name in wanted}
    dictionaries = HERE / "dictionaries"
    dictionaries.mkdir(exist_ok=True)
    (dictionaries / "api.dict").write_text("".join(f"{json.dumps(word)}\n" for word in api_dictionary()))
    for name, inputs in seeds.items():
        directory = HERE / "corpus" / name
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        for index, data in enumerate(inputs):
            (directory / f"seed-{index}").write_bytes(data)
        print(f"{name}: {len(inputs)} seeds, {sum(map(len, inputs))} bytes")


if __name__ == "__main__":
    main()
