"""accel/cross.py's conversions without a VM: a programmed software platform goes to KVM's
VM-wide state and LAPIC pages and back, and keeps what both models hold."""

from __future__ import annotations

import dataclasses
import struct

import pytest

from pyvmm.accel.cross import check_cpuid, lapic_to_kvm, lapic_to_software, missing_features, to_kvm, to_software
from pyvmm.arch.x86_64.cpu_state import EventsState, FpuState, GuestCpuView, SegmentState, TableState, VcpuState
from pyvmm.kvm.system import CpuidEntry
from pyvmm.persist import StateError
from pyvmm.platform.lapic import REG_LVT_TIMER, REG_SVR, REG_TIMER_DIVIDE, REG_TIMER_INITIAL
from pyvmm.platform.machine import SoftwarePlatform

TIMER_HZ = 1_000_000_000


class FakeTime:
    ns = 5_000_000_000

    def __call__(self):
        return self.ns


def _platform(time):
    machine = SoftwarePlatform(lambda: None, 2_000_000_000, lapic_timer_hz=TIMER_HZ)
    machine.clock._time_source = time
    machine.clock._offset = time()
    machine.add_cpu(0)
    return machine


def _vcpu() -> VcpuState:
    segment = SegmentState(selector=0, base=0, limit=0xFFFF, type=3, present=1, dpl=0, db=0, s=1, l=0, g=0, avl=0,
                           unusable=0)
    return VcpuState(gprs=dict.fromkeys(("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
                                         "r11", "r12", "r13", "r14", "r15"), 0),
                     rip=0, rflags=2, segments=dict.fromkeys(("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"), segment),
                     gdt=TableState(base=0, limit=0xFFFF), idt=TableState(base=0, limit=0xFFFF), cr0=0x11, cr2=0,
                     cr3=0, cr4=0, cr8=0, efer=0, apic_base=0xFEE00900, dr=(0, 0, 0, 0), dr6=0xFFFF0FF0, dr7=0x400,
                     fpu=FpuState.reset(), xsave=None, msrs={0x10: 12345}, events=EventsState.none(),
                     mp_state="runnable", lapic=None)


def _programmed():
    time = FakeTime()
    machine = _platform(time)
    pic = machine.pic
    for ports, base, cascade, mask in ((pic.master_ports, 0x20, 4, 0xFA), (pic.slave_ports, 0x28, 2, 0xFF)):
        for value in (0x11, base, cascade, 0x01, mask):
            ports.write(0 if value == 0x11 else 1, bytes([value]))
    machine.pit.write(3, bytes([0x34]))                 # counter 0, LSB then MSB, mode 2
    machine.pit.write(0, bytes([0xA9]))                 # 1193: 1 ms
    machine.pit.write(0, bytes([0x04]))
    machine.ioapic.write(0, struct.pack("<I", 0x10 + 2 * 4))
    machine.ioapic.write(0x10, struct.pack("<I", 0x8031))   # pin 4: vector 0x31, level
    lapic = machine.lapics[0]
    for offset, value in ((REG_SVR, 0x1FF), (REG_TIMER_DIVIDE, 0xB), (REG_LVT_TIMER, 0x20040),
                          (REG_TIMER_INITIAL, 1_000_000)):
        lapic.write(offset, struct.pack("<I", value))
    time.ns += 300_000                                  # 0.3 ms into the 1 ms LAPIC period
    machine.clock.pause()
    return machine.save()


def test_a_programmed_software_platform_goes_to_kvm_and_back():
    saved = _programmed()
    view = GuestCpuView(cpuid=(), tsc_khz=2_000_000, lapic_timer_hz=TIMER_HZ)
    kvm, vcpus = to_kvm(saved, (_vcpu(),), view)
    page = vcpus[0].lapic
    assert page is not None
    assert struct.unpack_from("<I", page, 0x390)[0] == 700_000       # TMCCT: what is left of the period
    assert kvm.pic_master.registers["irq_base"] == 0x20 and kvm.pic_master.registers["imr"] == 0xFA
    assert kvm.pit_channels[0].registers["count"] == 1193 and kvm.pit_channels[0].registers["mode"] == 2
    assert kvm.ioapic.redirection[4] & 0xFFFF == 0x8031
    assert kvm.pit_channels[1].registers["mode"] == 0xFF            # never programmed: no KVM timer
    back, back_vcpus = to_software(kvm, vcpus, view)
    assert back.pic == saved.pic
    assert back.ioapic == saved.ioapic
    assert back_vcpus[0].lapic is None and back_vcpus[0].msrs == {0x10: 12345}
    lapic, original = back.lapics[0], saved.lapics[0]
    same = [f.name for f in dataclasses.fields(lapic) if f.name not in ("timer_start_ns", "timer_next_ns")]
    assert {n: getattr(lapic, n) for n in same} == {n: getattr(original, n) for n in same}
    assert (lapic.timer_start_ns, lapic.timer_next_ns) == (original.timer_start_ns, original.timer_next_ns)
    counter = back.pit.counters[0]
    assert (counter.mode, counter.reload, counter.loaded, counter.access) == (2, 1193, True, 3)
    assert counter.base_ns == back.clock.now_ns and counter.next_edge_tick == 1193   # KVM restarts the count
    assert not back.pit.counters[1].loaded


def test_a_lapic_page_without_a_running_timer_has_no_deadline():
    saved = _programmed()
    lapic = dataclasses.replace(saved.lapics[0], timer_initial=0, timer_next_ns=None)
    state = lapic_to_software(lapic_to_kvm(lapic, saved.clock.now_ns, TIMER_HZ), lapic.apic_base, 0, False,
                              saved.clock.now_ns, TIMER_HZ)
    assert state.timer_next_ns is None and state.timer_initial == 0


def test_an_init_not_yet_taken_cannot_go_to_kvm():
    saved = _programmed()
    lapic = dataclasses.replace(saved.lapics[0], startup_events=(("init", 0),))
    with pytest.raises(StateError, match=r"^vm state: platform\.lapics: LAPIC 0 holds an INIT or startup IPI its "
                                         r"vCPU has not taken$"):
        lapic_to_kvm(lapic, 0, TIMER_HZ)


def test_cpuid_features_are_compared_bit_by_bit():
    shown = [CpuidEntry(0, 0, 0, 0xD, *(int.from_bytes(w, "little") for w in (b"Genu", b"ntel", b"ineI"))),
             CpuidEntry(1, 0, 0, 0, 0, 1 << 23 | 1 << 27, 1 << 1), CpuidEntry(7, 0, 0, 0, 1 << 5, 0, 0)]
    offered = [shown[0], CpuidEntry(1, 0, 0, 0, 0, 0, 0), CpuidEntry(7, 0, 0, 0, 1 << 5 | 1 << 3, 0, 0)]
    assert missing_features(shown, offered) == ["popcnt", "vme"]     # OSXSAVE mirrors CR4: not a feature
    assert missing_features(offered, shown) == ["bmi1"]
    with pytest.raises(StateError, match=r"^vm state: guest_view\.cpuid: the guest saw CPU features KVM does not "
                                         r"offer: popcnt, vme$"):
        check_cpuid(shown, offered, "KVM")
    amd = [CpuidEntry(0, 0, 0, 0xD, *(int.from_bytes(w, "little") for w in (b"Auth", b"cAMD", b"enti")))]
    with pytest.raises(StateError, match=r"^vm state: guest_view\.cpuid: the guest saw a GenuineIntel CPU, KVM "
                                         r"offers AuthenticAMD$"):
        check_cpuid(shown, amd + offered[1:], "KVM")


@pytest.mark.parametrize("lvt_mode, due", [(1 << 17, True), (0, False)], ids=["periodic", "one-shot"])
def test_a_count_read_at_zero_is_due_now_if_periodic_and_over_if_one_shot(lvt_mode, due):
    """KVM reads a periodic count as 0 between its expiry and the re-arm: the timer must go on
    (it stopped for good on the software CPU), where a one-shot timer at 0 has fired."""
    saved = _programmed()
    lapic = saved.lapics[0]
    page = bytearray(lapic_to_kvm(lapic, saved.clock.now_ns, TIMER_HZ))
    lvt = struct.unpack_from("<I", page, REG_LVT_TIMER)[0] & ~(3 << 17) | lvt_mode
    struct.pack_into("<I", page, REG_LVT_TIMER, lvt)
    struct.pack_into("<I", page, 0x390, 0)   # TMCCT
    now = saved.clock.now_ns
    state = lapic_to_software(bytes(page), lapic.apic_base, 0, False, now, TIMER_HZ)
    assert state.timer_next_ns == (now if due else None)
