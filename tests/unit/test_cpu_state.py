"""The saved vCPU and KVM VM-wide states: JSON round trips of any valid state, and a one-line
StateError naming the field for anything out of range or inconsistent."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.state import changed, tampered, through_json
from pyvmm.accel.kvm.state import (
    PIC_FIELDS, PIT_CHANNEL_FIELDS, IoapicState, KvmVmState, PicState, PitChannelState,
)
from pyvmm.accel.tcg.vcpu_state import cache_flags, segment_from_cache
from pyvmm.arch.x86_64.cpu_state import (
    GPR_NAMES, MP_STATES, SEGMENT_NAMES, EventsState, FpuState, SegmentState, TableState, VcpuState, XsaveState,
)
from pyvmm.persist import StateError

U64 = st.integers(0, (1 << 64) - 1)
bit = st.integers(0, 1)

segments = st.builds(SegmentState, selector=st.integers(0, 0xFFFF), base=U64, limit=st.integers(0, 0xFFFFFFFF),
                     type=st.integers(0, 15), present=bit, dpl=st.integers(0, 3), db=bit, s=bit, l=bit, g=bit,
                     avl=bit, unusable=bit)
fpus = st.builds(FpuState, fcw=st.integers(0, 0xFFFF), fsw=st.integers(0, 0xFFFF), ftw=st.integers(0, 0xFF),
                 fop=st.integers(0, 0x7FF), fip=U64, fdp=U64, mxcsr=st.integers(0, 0xFFFF),
                 st=st.tuples(*[st.binary(min_size=10, max_size=10)] * 8),
                 xmm=st.tuples(*[st.binary(min_size=16, max_size=16)] * 16))


@st.composite
def xsaves(draw):
    xcr0 = draw(st.integers(0, 0xFF)) | 1
    in_use = draw(st.integers(0, 0xFF)) & (xcr0 | 3)
    components = {n: draw(st.binary(min_size=1, max_size=64)) for n in range(2, 8) if in_use >> n & 1}
    return XsaveState(xcr0=xcr0, xstate_bv=in_use, components=components)


events = st.builds(EventsState, exception_injected=st.booleans(), exception_pending=st.booleans(),
                   exception_vector=st.integers(0, 255), exception_error_code=st.none() | st.integers(0, 0xFFFFFFFF),
                   exception_payload=st.none() | U64, interrupt_injected=st.booleans(),
                   interrupt_vector=st.integers(0, 255), interrupt_soft=st.booleans(),
                   interrupt_shadow=st.integers(0, 3), nmi_injected=st.booleans(), nmi_pending=st.booleans(),
                   nmi_masked=st.booleans(), sipi_vector=st.integers(0, 255), smm=st.booleans(),
                   smi_pending=st.booleans(), latched_init=st.booleans(), triple_fault_pending=st.booleans())
tables = st.builds(TableState, base=U64, limit=st.integers(0, 0xFFFF))
vcpus = st.builds(
    VcpuState, gprs=st.fixed_dictionaries({name: U64 for name in GPR_NAMES}), rip=U64, rflags=U64,
    segments=st.fixed_dictionaries({name: segments for name in SEGMENT_NAMES}), gdt=tables, idt=tables,
    cr0=U64, cr2=U64, cr3=U64, cr4=U64, cr8=st.integers(0, 15), efer=U64, apic_base=U64,
    dr=st.tuples(U64, U64, U64, U64), dr6=U64, dr7=U64, fpu=fpus, xsave=st.none() | xsaves(),
    msrs=st.dictionaries(st.integers(0, 0xFFFFFFFF), U64, max_size=8), events=events,
    mp_state=st.sampled_from(MP_STATES), lapic=st.none() | st.binary(min_size=1024, max_size=1024))
vm_states = st.builds(
    KvmVmState,
    pic_master=st.builds(PicState, registers=st.fixed_dictionaries({n: st.integers(0, 255) for n in PIC_FIELDS})),
    pic_slave=st.builds(PicState, registers=st.fixed_dictionaries({n: st.integers(0, 255) for n in PIC_FIELDS})),
    ioapic=st.builds(IoapicState, base_address=U64, ioregsel=st.integers(0, 0xFF), id=st.integers(0, 0xFFFFFFFF),
                     irr=st.integers(0, 0xFFFFFFFF), redirection=st.tuples(*[U64] * 24)),
    pit_channels=st.tuples(*[st.builds(PitChannelState, registers=st.fixed_dictionaries(
        {n: st.integers(0, 0xFF) for n in PIT_CHANNEL_FIELDS}))] * 3),
    pit_flags=st.integers(0, 3), clock_ns=U64)


@settings(max_examples=50, deadline=None)
@given(vcpus)
def test_any_vcpu_state_survives_json(state):
    assert through_json(state) == state


@settings(max_examples=50, deadline=None)
@given(vm_states)
def test_any_kvm_vm_state_survives_json(state):
    assert through_json(state) == state


@given(segments)
def test_segment_cache_flags_round_trip(segment):
    """The software CPU's segment cache holds a segment's attributes in the descriptor's bits."""
    again = segment_from_cache(segment.selector, segment.base, segment.limit, cache_flags(segment))
    assert again == changed(segment, unusable=0 if segment.present else 1)


def test_fpu_state_through_fxsave_layout():
    fpu = changed(FpuState.reset(), fcw=0x27F, fsw=0x3800, ftw=0x80, fip=0x1234, mxcsr=0x7F80,
                  st=tuple(bytes([i]) * 10 for i in range(8)), xmm=tuple(bytes([i]) * 16 for i in range(16)))
    area = fpu.fxsave()
    assert len(area) == 512 and area[24:28] == (0x7F80).to_bytes(4, "little") and area[32:42] == bytes(10)
    assert area[160 + 16 * 15:176 + 16 * 15] == bytes([15]) * 16
    assert FpuState.from_fxsave(area) == fpu


@pytest.fixture(scope="module")
def sample():
    segment = SegmentState(selector=0x10, base=0, limit=0xFFFFFFFF, type=0xB, present=1, dpl=0, db=0, s=1, l=1,
                           g=1, avl=0, unusable=0)
    return VcpuState(gprs=dict.fromkeys(GPR_NAMES, 0), rip=0x100000, rflags=2,
                     segments=dict.fromkeys(SEGMENT_NAMES, segment), gdt=TableState(base=0x500, limit=39),
                     idt=TableState(base=0, limit=0), cr0=0x80000011, cr2=0, cr3=0x9000, cr4=0x20, cr8=0,
                     efer=0x500, apic_base=0xFEE00900, dr=(0, 0, 0, 0), dr6=0xFFFF0FF0, dr7=0x400,
                     fpu=FpuState.reset(), xsave=None, msrs={0x10: 1234}, events=EventsState.none(),
                     mp_state="runnable", lapic=bytes(1024))


@pytest.mark.parametrize("field,value,message", [
    ("gprs", {"rax": 0}, r"gprs: expected exactly rax"),
    ("cr8", 16, r"cr8: 16 is outside 0..15"),
    ("mp_state", "asleep", r"mp_state: 'asleep' is not one of"),
    ("lapic", bytes(100), r"lapic: expected 1024 bytes"),
    ("dr", (0, 0, 0, 1 << 64), r"dr\[3\]"),
    ("msrs", {0x10: -1}, r"msrs\[0x10\]"),
])
def test_bad_vcpu_fields_are_one_line_errors(sample, field, value, message):
    with pytest.raises(StateError, match=r"^x86-vcpu state: " + message):
        changed(sample, **{field: value})


def test_bad_nested_fields_name_the_field(sample):
    with pytest.raises(StateError, match=r"^x86-segment state: dpl: 4 is outside 0..3"):
        changed(sample.segments["cs"], dpl=4)
    with pytest.raises(StateError, match=r"^x86-xsave state: xstate_bv: 0x4 holds components XCR0 0x1 does not enable"):
        XsaveState(xcr0=1, xstate_bv=4, components={2: b"x"})
    with pytest.raises(StateError, match=r"^x86-xsave state: components: component 3 is not one in use"):
        XsaveState(xcr0=0xF, xstate_bv=4, components={3: b"x"})
    with pytest.raises(StateError, match=r"^x86-fpu state: xmm: expected 16 registers of 16 bytes"):
        changed(FpuState.reset(), xmm=(bytes(16),) * 8)
    with pytest.raises(StateError, match=r"^kvm-pic state: registers\[imr\]: 256 is outside 0..255"):
        PicState(registers={**dict.fromkeys(PIC_FIELDS, 0), "imr": 256})


def test_a_tampered_file_is_refused_with_the_field_named(sample):
    with pytest.raises(StateError, match=r"^x86-vcpu state: missing field rip|^x86-vcpu state: unknown field"):
        data = tampered(sample)
        del data["fields"]["rip"]
        VcpuState.from_dict(data)
    with pytest.raises(StateError, match=r"^x86-vcpu state: mp_state"):
        VcpuState.from_dict(tampered(sample, mp_state="running"))
    with pytest.raises(StateError, match=r"version 2 is not supported"):
        VcpuState.from_dict({**sample.to_dict(), "version": 2})
