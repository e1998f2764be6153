"""The ctypes mirrors in pyvmm.kvm match the kernel headers installed on this machine.

A C probe compiled against <linux/kvm.h> prints sizes, field offsets and ioctl
numbers; each must equal what pyvmm computes.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest

from pyvmm.kvm import ioctls, stats, uapi

STRUCTS = [name for name in dir(uapi) if name.startswith("kvm_") and isinstance(getattr(uapi, name), type)
           and issubclass(getattr(uapi, name), (ctypes.Structure, ctypes.Union))]
# pyvmm names for anonymous or flexible C structs -> the C expression to measure
C_NAMES = {
    "kvm_cpuid2_header": "struct kvm_cpuid2",
    "kvm_msrs_header": "struct kvm_msrs",
    "kvm_msr_list_header": "struct kvm_msr_list",
    "kvm_irq_routing_header": "struct kvm_irq_routing",
    "kvm_irq_routing_entry_u": "((struct kvm_irq_routing_entry *)0)->u",
    "kvm_irqchip_chip": "((struct kvm_irqchip *)0)->chip",
    "kvm_run_exit": None,  # checked through kvm_run's field offsets
    "kvm_run_io": None, "kvm_run_mmio": None, "kvm_run_fail_entry": None, "kvm_run_ex": None,
    "kvm_run_internal": None, "kvm_run_system_event": None, "kvm_run_debug_arch": None, "kvm_run_msr": None,
}
OFFSETS = [
    ("kvm_run", "exit_reason", "exit_reason"),
    ("kvm_run", "immediate_exit", "immediate_exit"),
    ("kvm_run", "exit", "io"),
    ("kvm_run", "kvm_valid_regs", "kvm_valid_regs"),
    ("kvm_run", "s", "s"),
    ("kvm_sregs", "efer", "efer"),
    ("kvm_sregs", "interrupt_bitmap", "interrupt_bitmap"),
    ("kvm_fpu", "xmm", "xmm"),
    ("kvm_fpu", "mxcsr", "mxcsr"),
    ("kvm_vcpu_events", "sipi_vector", "sipi_vector"),
    ("kvm_vcpu_events", "exception_payload", "exception_payload"),
    ("kvm_ioeventfd", "flags", "flags"),
    ("kvm_irqfd", "resamplefd", "resamplefd"),
    ("kvm_pit_state2", "flags", "flags"),
    ("kvm_irq_routing_entry", "u", "u"),
    ("kvm_irq_routing_msi", "data", "data"),
    ("kvm_irq_routing_msi", "devid", "devid"),
    ("kvm_msi", "devid", "devid"),
    ("kvm_irq_routing_header", "flags", "flags"),
    ("kvm_debugregs", "dr7", "dr7"),
    ("kvm_debugregs", "flags", "flags"),
    ("kvm_ioapic_state", "irr", "irr"),
    ("kvm_ioapic_state", "redirtbl", "redirtbl"),
    ("kvm_pic_state", "elcr", "elcr"),
    ("kvm_irqchip", "chip", "chip"),
    ("kvm_clock_data", "realtime", "realtime"),
    ("kvm_clock_data", "host_tsc", "host_tsc"),
    ("kvm_vcpu_events", "flags", "flags"),
    ("kvm_vcpu_events", "smi", "smi"),
    ("kvm_vcpu_events", "triple_fault_pending", "triple_fault"),
    ("kvm_pit_channel_state", "count_load_time", "count_load_time"),
    ("kvm_lapic_state", "regs", "regs"),
    ("kvm_xcrs", "xcrs", "xcrs"),
    ("kvm_fpu", "ftwx", "ftwx"),
    ("kvm_fpu", "last_ip", "last_ip"),
]
# C structs ending in a flexible array, built in Python by a factory: where the array starts
FLEXIBLE_ARRAYS = [("kvm_irq_routing", "entries"), ("kvm_cpuid2", "entries"), ("kvm_msrs", "entries"),
                   ("kvm_xsave2", "region")]
FLEXIBLE_C_NAMES = {"kvm_xsave2": "kvm_xsave"}  # struct kvm_xsave: 4096 bytes, then `extra` (XSAVE2)
# Constants pyvmm uses to read and write saved state, compared with the headers' values.
CONSTANTS = [name for name in dir(uapi) if name.startswith(("KVM_CAP_", "KVM_VCPUEVENT_", "KVM_CLOCK_", "KVM_MP_STATE_",
                                                            "KVM_IRQCHIP_", "KVM_IOAPIC_NUM_PINS"))]
STATS_STRUCTS = ["kvm_stats_header", "kvm_stats_desc"]
RUN_EXIT_OFFSETS = [
    ("io", "port"), ("io", "data_offset"), ("mmio", "phys_addr"), ("mmio", "len"), ("mmio", "is_write"),
    ("internal", "data"), ("system_event", "type"), ("fail_entry", "cpu"),
]


def _probe_source() -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>", "int main(void) {"]
    for name in STRUCTS:
        c_name = C_NAMES.get(name, f"struct {name}")
        if c_name:
            lines.append(f'printf("size {name} %zu\\n", sizeof({c_name}));')
    for struct, py_field, c_field in OFFSETS:
        member = "io" if py_field == "exit" else c_field
        c_struct = C_NAMES.get(struct) or f"struct {struct}"
        lines.append(f'printf("offset {struct}.{py_field} %zu\\n", offsetof({c_struct}, {member}));')
    for union_member, field in RUN_EXIT_OFFSETS:
        lines.append(f'printf("runexit {union_member}.{field} %zu\\n", offsetof(struct kvm_run, {union_member}.{field}));')
    for flexible, array in FLEXIBLE_ARRAYS:
        c_struct = FLEXIBLE_C_NAMES.get(flexible, flexible)
        lines.append(f'printf("flex {flexible}.{array} %zu\\n", offsetof(struct {c_struct}, {array}));')
    lines.append('printf("const KVM_XSAVE_EXTRA %zu\\n", offsetof(struct kvm_xsave, extra));')
    for struct in STATS_STRUCTS:  # the binary stats fd's layout (kvm/stats.py)
        lines.append(f'printf("stats {struct} %zu\\n", sizeof(struct {struct}));')
        for field, _ in getattr(stats, struct)._fields_:
            lines.append(f'printf("stats {struct}.{field} %zu\\n", offsetof(struct {struct}, {field}));')
    for name in CONSTANTS:
        lines.append(f'printf("const {name} %lu\\n", (unsigned long)({name}));')
    for name in ioctls.ALL:
        lines.append(f'printf("ioctl {name} %lu\\n", (unsigned long)({name}));')
    lines.append("return 0; }")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def kernel_abi(tmp_path_factory) -> dict[str, int]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("no C compiler: the ABI check needs gcc and the Linux UAPI headers (linux-libc-dev)")
    directory = tmp_path_factory.mktemp("abi")
    source, binary = directory / "probe.c", directory / "probe"
    source.write_text(_probe_source())
    subprocess.run([cc, "-o", str(binary), str(source)], check=True, capture_output=True)
    output = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    return {f"{kind} {key}": int(value) for kind, key, value in (line.split() for line in output.splitlines())}


@pytest.mark.parametrize("name", [n for n in STRUCTS if C_NAMES.get(n, True)])
def test_struct_size_matches_kernel(kernel_abi, name):
    assert ctypes.sizeof(getattr(uapi, name)) == kernel_abi[f"size {name}"]


@pytest.mark.parametrize("struct,py_field,c_field", OFFSETS)
def test_field_offset_matches_kernel(kernel_abi, struct, py_field, c_field):
    assert getattr(getattr(uapi, struct), py_field).offset == kernel_abi[f"offset {struct}.{py_field}"]


@pytest.mark.parametrize("member,field", RUN_EXIT_OFFSETS)
def test_kvm_run_exit_union_offsets(kernel_abi, member, field):
    union_type = dict(uapi.kvm_run_exit._fields_)[member]
    offset = uapi.kvm_run.exit.offset + getattr(union_type, field).offset
    assert offset == kernel_abi[f"runexit {member}.{field}"]


@pytest.mark.parametrize("factory,array", FLEXIBLE_ARRAYS)
def test_flexible_array_offsets(kernel_abi, factory, array):
    assert getattr(getattr(uapi, factory)(2), array).offset == kernel_abi[f"flex {factory}.{array}"]


@pytest.mark.parametrize("name", sorted(ioctls.ALL))
def test_ioctl_number_matches_kernel(kernel_abi, name):
    assert ioctls.ALL[name] == kernel_abi[f"ioctl {name}"]


def test_every_struct_is_size_checked_at_import():
    for name in STRUCTS:
        if C_NAMES.get(name, True):
            assert getattr(uapi, name) in uapi.ABI_SIZES, f"{name} has no ABI size assertion"


@pytest.mark.parametrize("name", CONSTANTS)
def test_constant_matches_kernel(kernel_abi, name):
    assert getattr(uapi, name) == kernel_abi[f"const {name}"]


def test_xsave2_area_extends_kvm_xsave(kernel_abi):
    """KVM_GET_XSAVE2 writes past struct kvm_xsave's 4096 bytes into its flexible `extra`."""
    assert kernel_abi["const KVM_XSAVE_EXTRA"] == ctypes.sizeof(uapi.kvm_xsave) == 4096
    assert ctypes.sizeof(uapi.kvm_xsave2(8192)) == 8192


@pytest.mark.parametrize("struct", STATS_STRUCTS)
def test_binary_stats_structs_match_kernel(kernel_abi, struct):
    cls = getattr(stats, struct)
    assert ctypes.sizeof(cls) == kernel_abi[f"stats {struct}"]  # kvm_stats_desc: without its name
    for field, _ in cls._fields_:
        assert getattr(cls, field).offset == kernel_abi[f"stats {struct}.{field}"], field
