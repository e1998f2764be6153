"""`pyvmm mem`: a running VM's memory, as its guest and its host see it.

    pyvmm mem translate NAME GVA [--vcpu N] [--json]
        the page walk of guest-virtual GVA, level by level (table, entry, flags), then the
        guest-physical, host-virtual and host-physical address (and KVM_TRANSLATE's answer on
        KVM); a GVA the walk cannot map prints the walk up to where it stopped, then one error
        line, exit status 2
    pyvmm mem stats NAME [--json]
        resident guest RAM, pages KSM merged, the balloon's target and size, the guest's free
        memory (balloon_cli.py)
    pyvmm mem read NAME ADDR LEN [--physical] [--vcpu N] [--output FILE]
        LEN bytes at guest-virtual ADDR (through vCPU N's page tables) or guest-physical ADDR
        (--physical), as a hex dump, or raw into FILE ('-': stdout)

The work happens in the VM's own process (api/memory.py), which pauses the VM for it.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..errors import UserError

__all__ = ["register_cli", "run_mem_command"]

MAX_READ = 1 << 20


def register_cli(subparsers, common: argparse.ArgumentParser) -> None:
    mem = subparsers.add_parser("mem", parents=[common], help="a running VM's memory: address translation, reads",
                                description="Inspect a running VM's memory (it is paused for each request).")
    commands = mem.add_subparsers(dest="mem_command", metavar="COMMAND", required=True)
    translate = commands.add_parser("translate", parents=[common], help="walk the guest's page tables for a GVA: "
                                    "GVA -> GPA -> HVA -> HPA, level by level")
    translate.add_argument("name", metavar="NAME", help="the VM's name")
    translate.add_argument("gva", metavar="GVA", help="guest-virtual address (hex 0x... or decimal)")
    translate.add_argument("--vcpu", type=int, default=0, metavar="N", help="whose page tables (default 0)")
    translate.add_argument("--json", action="store_true", help="the API's answer as JSON")
    read = commands.add_parser("read", parents=[common], help="read guest memory (hex dump, or raw to a file)")
    read.add_argument("name", metavar="NAME", help="the VM's name")
    read.add_argument("address", metavar="ADDR", help="guest-virtual address, or guest-physical with --physical")
    read.add_argument("length", metavar="LEN", help=f"bytes to read (at most {MAX_READ}; suffixes K, M)")
    read.add_argument("--physical", action="store_true", help="ADDR is guest-physical")
    read.add_argument("--vcpu", type=int, default=0, metavar="N", help="whose page tables (default 0)")
    read.add_argument("--output", "-o", metavar="FILE", help="write the raw bytes to FILE ('-': stdout)")
    stats = commands.add_parser("stats", parents=[common], help="the VM's memory: guest RAM resident on the host, "
                                "pages KSM merged, the balloon's target and size, the guest's free memory")
    stats.add_argument("name", metavar="NAME", help="the VM's name")
    stats.add_argument("--json", action="store_true", help="the API's answer as JSON")
    resize = commands.add_parser("resize", parents=[common], help="grow or shrink the memory the guest has "
                                 "plugged from its virtio-mem device (in 2 MiB blocks)")
    resize.add_argument("name", metavar="NAME", help="the VM's name")
    resize.add_argument("size", metavar="SIZE", help="the virtio-mem memory the guest should have, e.g. 512M "
                        "(0 gives it all back)")
    resize.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                        help="wait until the guest has plugged that much (exit 2 if it has not by then)")


def parse_address(text: str, what: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise UserError(f"{what}: not an address: {text!r} (hex 0x... or decimal)") from None
    if not 0 <= value < 1 << 64:
        raise UserError(f"{what}: {text} is not a 64-bit address")
    return value


def parse_length(text: str) -> int:
    scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:].upper(), 1)
    digits = text[:-1] if scale > 1 else text
    if not (digits.isascii() and digits.isdigit()) or not 1 <= int(digits) * scale <= MAX_READ:
        raise UserError(f"LEN: {text!r} is not a length of 1 to {MAX_READ} bytes")
    return int(digits) * scale


def run_mem_command(args: argparse.Namespace) -> int:
    from .client import connect

    vm = connect().vm(args.name)
    if args.mem_command == "stats":
        from .balloon_cli import print_memory_stats

        return print_memory_stats(vm, args.json)
    if args.mem_command == "resize":
        return resize(vm, args.size, args.wait)
    if args.vcpu < 0:
        raise UserError(f"--vcpu: {args.vcpu} is not a vCPU index")
    if args.mem_command == "translate":
        gva = parse_address(args.gva, "GVA")
        result = vm.translate(gva, vcpu=args.vcpu)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            sys.stdout.write(render_translation(result))
        sys.stdout.flush()
        if not result["mapped"] or result["hva"] is None:
            raise UserError(f"GVA {gva:#x} is not mapped: {result['fault']}")
        return 0
    address, length = parse_address(args.address, "ADDR"), parse_length(args.length)
    data = vm.read_memory(address, length, physical=args.physical, vcpu=args.vcpu)
    if args.output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    elif args.output:
        with open(args.output, "wb") as out:
            out.write(data)
    else:
        sys.stdout.write(hexdump(data, address))
    return 0


def hexdump(data: bytes, base: int) -> str:
    """16 bytes a line: address, hex bytes, printable ASCII (like xxd)."""
    lines = []
    for offset in range(0, len(data), 16):
        row = data[offset:offset + 16]
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in row)
        hex_part = " ".join(row[i:i + 2].hex() for i in range(0, len(row), 2))
        lines.append(f"{base + offset:016x}: {hex_part:<39}  {text}\n")
    return "".join(lines)


def _size(size: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} bytes"


def render_translation(result: dict[str, Any]) -> str:
    """The walk as text, one line per level, then each address space's address."""
    out = [f"GVA {result['gva']:#x}, vCPU {result['vcpu']}: paging {result['mode']}"
           + ("" if result.get("cr3") is None else
              f" (CR0 {result['cr0']:#x} CR3 {result['cr3']:#x} CR4 {result['cr4']:#x} EFER {result['efer']:#x})")]
    for level in result["levels"]:
        entry = "outside guest RAM" if level["entry"] is None else f"{level['entry']:#018x}"
        out.append(f"  {level['level']:<4}  table {level['table']:#x}  [{level['index']:3d}] at "
                   f"{level['entry_address']:#x}: {entry}  {' '.join(level['flags'])}".rstrip())
    if not result["mapped"]:
        out.append(f"  stops: {result['fault']}")
    else:
        access = result["access"] or {}
        rights = ", ".join(name for name in ("writable", "user", "executable") if access.get(name)) or "read-only"
        page = f"{_size(result['page_size'])} page" if result["page_size"] else "paging off"
        out.append(f"GPA {result['gpa']:#x}  ({page}; {rights})")
        if result["hva"] is None:
            out.append(f"HVA none: {result['fault']}")
        else:
            out.append(f"HVA {result['hva']:#x}  (guest RAM mapped in pyvmm's process {result.get('pid')})")
            host = result["host"] or {}
            if host.get("hpa") is not None:
                out.append(f"HPA {host['hpa']:#x}  (/proc/{result.get('pid')}/pagemap: page present)")
            else:
                out.append(f"HPA unknown: {host.get('note', '')}")
    kvm = result.get("kvm_translate")
    if kvm is not None:
        said = f"GPA {kvm['gpa']:#x}" if kvm["valid"] else "not mapped"
        out.append(f"KVM_TRANSLATE: {said} ({'agrees' if kvm['agrees'] else 'DIFFERS from the walk above'})")
    return "\n".join(out) + "\n"



def resize(vm, text: str, wait: float) -> int:
    """Set the virtio-mem requested size; with `wait`, follow the guest until it has plugged it."""
    import time

    from ..config import ConfigError, parse_size

    try:
        size = parse_size(text, "SIZE")
    except ConfigError:
        raise UserError(f"SIZE: {text!r} is not a size (e.g. 512M, 2G)") from None
    if size % (1 << 20):
        raise UserError(f"SIZE: {text!r} is not a whole number of MiB")
    vm.resize_memory(size >> 20)
    status = vm.virtio_mem()
    deadline = time.monotonic() + wait
    while status["plugged_size_mib"] != status["requested_size_mib"] and time.monotonic() < deadline:
        time.sleep(0.2)
        status = vm.virtio_mem()
    print(f"virtio-mem: {status['plugged_size_mib']} MiB plugged, {status['requested_size_mib']} MiB requested "
          f"(region {status['region_size_mib']} MiB at {status['address']:#x}, {status['block_size_mib']} MiB blocks)")
    if wait and status["plugged_size_mib"] != status["requested_size_mib"]:
        raise UserError(f"the guest has plugged {status['plugged_size_mib']} MiB of the {status['requested_size_mib']} "
                        f"MiB requested after {wait:g} s (is its virtio_mem driver loaded?)")
    return 0
