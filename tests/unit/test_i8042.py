import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.devices.legacy import I8042
from helpers.irq import RecordingIrq
from helpers.state import changed, tampered, through_json
from pyvmm.devices.legacy.i8042 import I8042State
from pyvmm.persist import StateError

NO_PULSE = "the i8042 drives levels, it does not pulse"  # what a pulse on its interrupt line would mean

DATA, CMD = 0, 4
OBF, SYS, CMD_BIT, AUXDATA, TIMEOUT = 0x01, 0x04, 0x08, 0x20, 0x40


class Machine:
    def __init__(self, **irqs):
        self.resets = 0
        self.kbd = self.i8042 = I8042(self.reset, **irqs)

    def reset(self):
        self.resets += 1

    def status(self):
        return self.i8042.read(CMD, 1)[0]

    def command(self, value):
        self.i8042.write(CMD, bytes((value,)))

    def data(self, value):
        self.i8042.write(DATA, bytes((value,)))

    def read_data(self):
        return self.i8042.read(DATA, 1)[0]

    def drain(self):
        out = []
        while self.status() & OBF:
            out.append(self.read_data())
            assert len(out) < 100
        return out


# --- reset line ---------------------------------------------------------------------------


def test_pulse_reset_command_fe():
    m = Machine()
    m.command(0xFE)
    assert m.resets == 1
    assert m.i8042.resets_requested == 1


def test_pulse_commands_without_bit0_do_not_reset():
    m = Machine()
    m.command(0xFF)
    m.command(0xFD)
    assert m.resets == 0
    m.command(0xF0)  # pulses bits 0-3, including reset
    assert m.resets == 1


def test_write_output_port_with_reset_bit_clear_resets():
    m = Machine()
    m.command(0xD1)
    assert m.resets == 0  # waits for its data byte
    m.data(0xFE)
    assert m.resets == 1


def test_write_output_port_with_reset_bit_set_does_not_reset():
    m = Machine()
    m.command(0xD1)
    m.data(0xDF)
    assert m.resets == 0
    m.command(0xD0)
    assert m.drain() == [0xDF]


def test_reset_callback_runs_outside_the_device_lock():
    calls = []

    def on_reset():
        calls.append(device.read(CMD, 1))  # would deadlock if called under the lock
        device.reset()

    device = I8042(on_reset)
    device.write(CMD, b"\xfe")
    assert len(calls) == 1


# --- controller commands ----------------------------------------------------------------------


def test_status_register_obf_follows_output_buffer():
    m = Machine()
    assert m.status() & OBF == 0
    m.command(0x20)
    assert m.status() & OBF
    assert m.status() & CMD_BIT
    assert m.read_data() == 0x45
    assert m.status() & OBF == 0


def test_write_command_byte_then_read_it_back():
    m = Machine()
    m.command(0x60)
    assert m.drain() == []
    m.data(0x47)
    assert m.status() & CMD_BIT == 0
    m.command(0x20)
    assert m.drain() == [0x47]
    m.command(0x60)
    m.data(0x41)  # system flag cleared
    assert m.status() & SYS == 0


def test_self_and_interface_tests():
    m = Machine()
    m.command(0xAA)
    assert m.drain() == [0x55]
    m.command(0xAB)
    assert m.drain() == [0x00]
    m.command(0xA9)
    assert m.drain() == [0x00]


def test_enable_disable_ports_update_command_byte():
    m = Machine()

    def ctr():
        m.command(0x20)
        return m.drain()[0]

    m.command(0xA7)
    assert ctr() & 0x20
    m.command(0xA8)
    assert ctr() & 0x20 == 0
    m.command(0xAD)
    assert ctr() & 0x10
    m.command(0xAE)
    assert ctr() & 0x10 == 0


def test_aux_loopback_marks_data_as_aux():
    m = Machine()
    m.command(0xD3)
    m.data(0x5A)
    status = m.status()
    assert status & (OBF | AUXDATA) == OBF | AUXDATA
    assert m.read_data() == 0x5A
    assert m.status() & (OBF | AUXDATA) == 0


def test_kbd_output_write_is_keyboard_data():
    m = Machine()
    m.command(0xD2)
    m.data(0x1C)
    assert m.status() & (OBF | AUXDATA) == OBF
    assert m.drain() == [0x1C]


def test_bytes_to_absent_mouse_come_back_as_timeout_error():
    m = Machine()
    m.command(0xD4)
    m.data(0xF2)
    assert m.status() & (OBF | AUXDATA | TIMEOUT) == OBF | AUXDATA | TIMEOUT
    assert m.drain() == [0xFE]


def test_new_command_abandons_pending_data_byte():
    m = Machine()
    m.command(0x60)
    m.command(0xAA)
    m.data(0xF2)  # now a keyboard command, not the command byte
    assert m.drain() == [0x55, 0xFA, 0xAB, 0x41]
    m.command(0x20)
    assert m.drain() == [0x45]


def test_unused_offsets_read_all_ones_and_ignore_writes():
    m = Machine()
    for offset in (1, 2, 3):
        assert m.i8042.read(offset, 1) == b"\xff"
        m.i8042.write(offset, b"\xfe")
    assert m.resets == 0
    assert m.drain() == []


# --- keyboard -----------------------------------------------------------------------------------


def test_keyboard_reset_answers_ack_then_self_test_passed():
    m = Machine()
    m.data(0xFF)
    assert m.status() & OBF
    assert m.read_data() == 0xFA
    assert m.status() & OBF
    assert m.read_data() == 0xAA
    assert m.status() & OBF == 0


def test_keyboard_id_translated_and_raw():
    m = Machine()
    m.data(0xF2)
    assert m.drain() == [0xFA, 0xAB, 0x41]
    m.command(0x60)
    m.data(0x05)  # translation off
    m.data(0xF2)
    assert m.drain() == [0xFA, 0xAB, 0x83]


def test_keyboard_command_parameters_are_acked_not_executed():
    m = Machine()
    m.data(0xED)  # set LEDs ...
    m.data(0xFF)  # ... parameter, not a reset
    assert m.drain() == [0xFA, 0xFA]
    m.data(0xEE)
    assert m.drain() == [0xEE]
    m.data(0xF4)
    assert m.drain() == [0xFA]


def test_scancode_set_query():
    m = Machine()
    m.command(0x60)
    m.data(0x05)
    m.data(0xF0)
    m.data(0x03)
    m.data(0xF0)
    m.data(0x00)
    assert m.drain() == [0xFA, 0xFA, 0xFA, 0xFA, 0x03]


def test_stale_data_read_repeats_last_byte():
    m = Machine()
    m.command(0xAA)
    assert m.read_data() == 0x55
    assert m.read_data() == 0x55
    assert m.status() & OBF == 0


# --- interrupt lines ------------------------------------------------------------------------------


def test_keyboard_irq_level_follows_output_buffer():
    kbd, aux = RecordingIrq(level_only=NO_PULSE), RecordingIrq(level_only=NO_PULSE)
    m = Machine(kbd_irq=kbd, aux_irq=aux)
    m.data(0xFF)
    assert kbd.levels == [True]
    m.read_data()
    assert kbd.high  # 0xAA is next
    m.read_data()
    assert kbd.levels == [True, False]
    assert aux.levels == []


def test_keyboard_irq_needs_command_byte_enable():
    kbd = RecordingIrq(level_only=NO_PULSE)
    m = Machine(kbd_irq=kbd)
    m.command(0x60)
    m.data(0x44)
    m.command(0xAA)
    assert kbd.levels == []
    assert m.drain() == [0x55]


def test_aux_irq_for_linux_aux_delivery_test():
    kbd, aux = RecordingIrq(level_only=NO_PULSE), RecordingIrq(level_only=NO_PULSE)
    m = Machine(kbd_irq=kbd, aux_irq=aux)
    m.command(0x60)
    m.data(0x47)  # AUXINT on
    m.command(0xD3)
    m.data(0xA5)
    assert aux.levels == [True]
    assert m.read_data() == 0xA5
    assert aux.levels == [True, False]
    assert kbd.levels == []


# --- save / restore -----------------------------------------------------------------------------


def test_save_restore_round_trip_with_pending_output_and_command():
    m = Machine()
    m.command(0x60)
    m.data(0x47)
    m.data(0xFF)
    assert m.read_data() == 0xFA
    m.data(0xED)  # LEDs parameter pending
    m.command(0xD1)  # output port byte pending
    state = through_json(m.i8042.save())

    kbd = RecordingIrq(level_only=NO_PULSE)
    clone = Machine(kbd_irq=kbd)
    clone.i8042.restore(state)
    assert kbd.levels == [True]  # 0xAA waits and KBDINT is set
    assert clone.i8042.save() == m.i8042.save()
    assert clone.read_data() == 0xAA
    assert clone.read_data() == 0xFA
    clone.data(0x00)  # completes 0xD1: reset
    assert clone.resets == 1
    clone.data(0x07)  # LED parameter
    assert clone.drain() == [0xFA]


def test_restore_rejects_malformed_state():
    m = Machine()
    good = m.i8042.save()
    with pytest.raises(StateError, match="ctr: -1 is outside"):
        changed(good, ctr=-1)
    with pytest.raises(StateError, match=r"i8042.output\[0\]: expected 2 items"):
        changed(good, output=((1,),))
    with pytest.raises(StateError, match=r"output\[0\]: \(1, 0x1\) is not a byte"):
        changed(good, output=((1, 1),))
    with pytest.raises(StateError, match="scancode_set: 7 is not 1, 2 or 3"):
        changed(good, scancode_set=7)
    data = tampered(good)
    del data["fields"]["output"]
    with pytest.raises(StateError, match="missing field output"):
        I8042State.from_dict(data)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5), st.binary(min_size=1, max_size=4)), max_size=60))
def test_arbitrary_accesses_never_raise_and_stay_bounded(ops):
    kbd, aux = RecordingIrq(level_only=NO_PULSE), RecordingIrq(level_only=NO_PULSE)
    m = Machine(kbd_irq=kbd, aux_irq=aux)
    for is_read, offset, data in ops:
        if is_read:
            assert len(m.i8042.read(offset, len(data))) == len(data)
        else:
            m.i8042.write(offset, data)
        state = m.i8042.save()
        assert len(state.output) <= 16
        for line in (kbd, aux):
            assert all(a != b for a, b in zip(line.levels, line.levels[1:]))
    state = m.i8042.save()
    clone = I8042(lambda: None)
    clone.restore(through_json(state))
    assert clone.save() == state
