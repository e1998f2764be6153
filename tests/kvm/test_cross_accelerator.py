"""A guest saved on one accelerator continues on the other (accel/cross.py): the same tiny
guests on KVM and on the software CPU, moved both ways through a VmState sent through JSON
(as another process reads it). roundtrip.S counts in memory and through the UART: the count
goes on from where it stood and the guest never restarts. lapic_ticks.S counts its LAPIC
timer's interrupts: the timer keeps ticking after the move. What cannot be kept is refused
with one line: CPU features the destination lacks, a LAPIC timer or TSC rate it cannot keep,
kvm-clock in use.

Each source machine shows only what the destination offers (`cpu_hide`: the features the
other accelerator lacks), and a software-CPU source runs its LAPIC timer at KVM's 1 GHz.

A guest never moves between CPU vendors (the software CPU shows GenuineIntel; KVM on an AMD
host shows AuthenticAMD): that refusal is tested on every host, the moves themselves where the
two accelerators show the same vendor (`same_vendor`)."""

from __future__ import annotations

import dataclasses
import functools
import json
import struct
import time

import pytest

from helpers.reporting import KVM_GUESTS
from pyvmm.accel.cross import missing_features
from pyvmm.accel.select import choose_accelerator
from pyvmm.accel.tcg.accelerator import TcgAccelerator
from pyvmm.arch.x86_64 import msrs as M
from pyvmm.arch.x86_64.cpuid import CpuidPolicy
from pyvmm.arch.x86_64.tsc_leaf import KVM_APIC_BUS_HZ
from pyvmm.builder import build_vm
from pyvmm.config import MachineConfig
from pyvmm.guests import build_source
from pyvmm.persist import StateError
from pyvmm.restore import carry_over, restore_vm
from pyvmm.vm_state import VmState

COUNT, LIMIT, STARTS = 0x300000, 0x300008, 0x300010
STEPS = 20000
TICKS, PERIOD = 0x300000, 0x300008
TIMER_PERIOD = 2_000_000            # LAPIC counts at 1 GHz, divide by 1: 2 ms
OK_STATUS = 1

pytestmark = pytest.mark.kvm
OTHER = {"kvm": "tcg", "tcg": "kvm"}


def _accel(name: str, *, kvm_timer: bool = True):
    if name == "tcg":
        return TcgAccelerator(lapic_timer_hz=KVM_APIC_BUS_HZ if kvm_timer else None)
    return choose_accelerator("kvm").create()


def _vendor_of(entries) -> str:
    leaf = next(e for e in entries if e.function == 0)
    return struct.pack("<III", leaf.ebx, leaf.edx, leaf.ecx).decode("latin-1")


@functools.cache
def _vendors() -> dict[str, str]:
    """The CPU vendor each accelerator shows a guest on this host."""
    shown = {}
    for name in ("tcg", "kvm"):
        accel = _accel(name)
        try:
            shown[name] = _vendor_of(accel.offered_cpuid(CpuidPolicy(), 1))
        finally:
            if name == "kvm":
                accel.close()
    return shown


@pytest.fixture
def same_vendor():
    """Moves between the accelerators need them to show one CPU vendor: on a host where they do
    not (an AMD host), test_a_guest_is_not_moved_across_cpu_vendors is what can be tested."""
    vendors = _vendors()
    if vendors["tcg"] != vendors["kvm"]:
        pytest.skip(f"the software CPU shows {vendors['tcg']}, KVM on this host {vendors['kvm']}: a guest is not "
                    "moved across CPU vendors")


def _portable_hide(source: str, destination: str) -> frozenset[str]:
    """The features `source` would show and `destination` does not offer."""
    src, dst = _accel(source), _accel(destination)
    try:
        return frozenset(missing_features(src.offered_cpuid(CpuidPolicy(), 1), dst.offered_cpuid(CpuidPolicy(), 1)))
    finally:
        if source == "kvm":
            src.close()
        if destination == "kvm":
            dst.close()


def _config(guest: str, bits: int, hide: frozenset[str] = frozenset()) -> MachineConfig:
    return MachineConfig(kernel=str(build_source(KVM_GUESTS / guest, bits)), memory=16 << 20, cpu_hide=hide)


def _wait_for(condition, what: str, vm, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert not vm.stopped, vm.outcome
        assert time.monotonic() < deadline, what
        time.sleep(0.002)


def _saved(vm):
    """Pause `vm`, save it through JSON, take its memory, close it: (state, carryover)."""
    try:
        vm.pause()
        state = VmState.from_dict(json.loads(json.dumps(vm.save().to_dict())))
        carried = carry_over(vm)
    finally:
        vm.close()
    return state, carried


def _counting_vm(source: str, *, kvm_timer: bool = True, hide: frozenset[str] | None = None):
    hide = _portable_hide(source, OTHER[source]) if hide is None else hide
    vm = build_vm(_config("roundtrip.S", 64, hide), lambda data: None, accel=_accel(source, kvm_timer=kvm_timer))
    vm.memory.write_u64(LIMIT, STEPS)
    vm.start()
    _wait_for(lambda: vm.memory.read_u64(COUNT) >= 300, "the guest never started counting", vm)
    return vm


@pytest.mark.parametrize("source", ["tcg", "kvm"])
def test_a_counting_guest_continues_on_the_other_accelerator(source, same_vendor):
    state, carried = _saved(_counting_vm(source))
    paused_at = carried.memory.read_u64(COUNT)
    assert state.accelerator == source and 0 < paused_at < STEPS
    destination = OTHER[source]
    vm = restore_vm(state, carried.memory, lambda data: None, accel=_accel(destination), carryover=carried)
    try:
        assert vm.accel.name == destination and vm.paused
        assert vm.memory.read_u64(COUNT) == paused_at
        vm.resume()
        outcome = vm.wait(180)
        assert outcome is not None, "the moved guest did not finish"
        assert (outcome.reason, outcome.status) == ("debug-exit", OK_STATUS), outcome.message
        assert vm.memory.read_u64(COUNT) == STEPS
        assert vm.memory.read_u64(STARTS) == 1      # went on, never restarted
        assert state.guest_view is not None and vm.accel.guest_view().cpuid == state.guest_view.cpuid  # the CPU kept
    finally:
        vm.close()


@pytest.mark.parametrize("source", ["tcg", "kvm"])
def test_the_lapic_timer_keeps_ticking_on_the_other_accelerator(source, same_vendor):
    hide = _portable_hide(source, OTHER[source])
    vm = build_vm(_config("lapic_ticks.S", 32, hide), lambda data: None, accel=_accel(source))
    vm.memory.write_u32(PERIOD, TIMER_PERIOD)
    vm.start()
    _wait_for(lambda: vm.memory.read_u32(TICKS) >= 5, "the timer never ticked", vm)
    state, carried = _saved(vm)
    ticks = carried.memory.read_u32(TICKS)
    lapic = state.platform.lapics[0] if source == "tcg" else None
    if lapic is not None:
        assert lapic.timer_initial == TIMER_PERIOD and lapic.timer_next_ns is not None
    vm = restore_vm(state, carried.memory, lambda data: None, accel=_accel(OTHER[source]), carryover=carried)
    try:
        time.sleep(0.1)
        assert vm.memory.read_u32(TICKS) == ticks, "the timer ticked before resume()"
        vm.resume()
        _wait_for(lambda: vm.memory.read_u32(TICKS) >= ticks + 10, "the timer stopped after the move", vm)
        vm.pause()
        saved = vm.save()
        timer = saved.platform.lapics[0] if OTHER[source] == "tcg" else None
        if timer is not None:   # the software LAPIC took KVM's period at KVM's rate
            assert timer.timer_initial == TIMER_PERIOD and timer.lvt[0] & 0xFF == 0x40
    finally:
        vm.close()


@pytest.mark.parametrize("source", ["tcg", "kvm"])
def test_a_guest_is_not_moved_across_cpu_vendors(source):
    """On every host: a guest that saw another vendor than the destination shows is refused in
    one line (where the two accelerators differ, as saved; where they match, with the saved
    view's vendor changed)."""
    destination = OTHER[source]
    state, carried = _saved(_counting_vm(source, hide=frozenset()))
    try:
        assert state.guest_view is not None
        offered = _vendors()[destination]
        if _vendor_of(state.guest_view.cpuid) == offered:
            other = "AuthenticAMD" if offered == "GenuineIntel" else "GenuineIntel"
            ebx, edx, ecx = struct.unpack("<III", other.encode())
            leaves = tuple(dataclasses.replace(leaf, ebx=ebx, edx=edx, ecx=ecx) if leaf.function == 0 else leaf
                           for leaf in state.guest_view.cpuid)
            state = dataclasses.replace(state, guest_view=dataclasses.replace(state.guest_view, cpuid=leaves))
        shown = _vendor_of(state.guest_view.cpuid)
        where = "the software CPU" if destination == "tcg" else "KVM on this host"
        _refused(state, carried, destination, rf"^vm state: guest_view\.cpuid: the guest saw a {shown} CPU, "
                                              rf"{where} offers {offered}$")
    finally:
        carried.close()


def _refused(state, carried, destination: str, message: str) -> None:
    with pytest.raises(StateError, match=message) as error:
        restore_vm(state, carried.memory, lambda data: None, accel=_accel(destination))
    assert "\n" not in str(error.value)


def test_features_the_software_cpu_lacks_are_refused(same_vendor):
    """A KVM guest shown KVM's own CPUID saw features the software CPU cannot give."""
    state, carried = _saved(_counting_vm("kvm", hide=frozenset()))
    try:
        _refused(state, carried, "tcg", r"^vm state: guest_view\.cpuid: the guest saw CPU features the software "
                                        r"CPU does not offer: [a-z0-9_, ]+ and \d+ more$")
    finally:
        carried.close()


def test_a_software_lapic_timer_rate_kvm_cannot_keep_is_refused(same_vendor):
    state, carried = _saved(_counting_vm("tcg", kvm_timer=False))
    try:
        assert state.guest_view is not None and state.guest_view.lapic_timer_hz != KVM_APIC_BUS_HZ
        _refused(state, carried, "kvm", r"^vm state: guest_view\.lapic_timer_hz: the guest's LAPIC timer counted "
                                        r"at \d+ Hz \(its CPUID leaf 0x15 says so\), KVM's in-kernel LAPIC timer "
                                        r"counts at 1000000000 Hz$")
    finally:
        carried.close()


def test_a_tsc_rate_or_kvm_clock_the_software_cpu_cannot_keep_is_refused(same_vendor):
    state, carried = _saved(_counting_vm("kvm"))
    try:
        assert state.guest_view is not None
        faster = dataclasses.replace(state, guest_view=dataclasses.replace(
            state.guest_view, tsc_khz=state.guest_view.tsc_khz * 2))
        _refused(faster, carried, "tcg", r"^vm state: guest_view\.tsc_khz: the guest's TSC ran at \d+ kHz, the "
                                         r"software CPU's reads this host's at \d+ kHz and cannot scale it$")
        vcpu = state.vcpus[0]
        clocked = dataclasses.replace(state, vcpus=(dataclasses.replace(
            vcpu, msrs={**vcpu.msrs, M.MSR_KVM_SYSTEM_TIME_NEW: 0x200001}),))
        _refused(clocked, carried, "tcg", r"^vm state: vcpus\[0\]\.msrs\[0x4b564d01\]: the guest uses kvm-clock, "
                                          r"which the software CPU does not have$")
        # nothing was harmed: the state as saved still continues there
        vm = restore_vm(state, carried.memory, lambda data: None, accel=_accel("tcg"), carryover=carried)
        try:
            vm.resume()
            outcome = vm.wait(180)
            assert outcome is not None and outcome.status == OK_STATUS
        finally:
            vm.close()
    finally:
        carried.close()


@pytest.mark.parametrize("source", ["tcg", "kvm"])
def test_snapshot_files_load_on_the_other_accelerator(source, tmp_path, same_vendor):
    """The same through snapshot files, as another process would load them."""
    from pyvmm.snapshot import load_snapshot, save_snapshot

    vm = _counting_vm(source)
    try:
        vm.pause()
        paused_at = vm.memory.read_u64(COUNT)
        save_snapshot(vm, tmp_path / "vm.state", tmp_path / "vm.mem")
    finally:
        vm.close()
    vm = load_snapshot(tmp_path / "vm.state", tmp_path / "vm.mem", lambda data: None, accel=_accel(OTHER[source]))
    try:
        assert vm.accel.name == OTHER[source] and vm.memory.read_u64(COUNT) == paused_at
        vm.resume()
        outcome = vm.wait(180)
        assert outcome is not None and (outcome.reason, outcome.status) == ("debug-exit", OK_STATUS), outcome
        assert vm.memory.read_u64(COUNT) == STEPS and vm.memory.read_u64(STARTS) == 1
    finally:
        vm.close()
