"""The Persist protocol's state base: typed fields, versions, one validation style."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmm.errors import UserError
from pyvmm.persist import State, StateError


@dataclasses.dataclass(frozen=True)
class Inner(State):
    KIND = "inner"
    level: bool
    data: bytes


@dataclasses.dataclass(frozen=True)
class Sample(State):
    KIND = "sample"
    VERSION = 2
    count: int
    name: str
    fifo: tuple[int, ...]
    pair: tuple[int, str]
    inner: Inner
    table: dict[int, Inner]
    maybe: int | None

    def validate(self) -> None:
        self.check_range("count", 0, 255)
        if len(self.fifo) > 16:
            self.fail("fifo", f"{len(self.fifo)} bytes, at most 16")


def sample(**changes) -> Sample:
    fields = dict(count=3, name="x", fifo=(1, 2), pair=(7, "y"), inner=Inner(True, b"\x00\xff"),
                  table={5: Inner(False, b"")}, maybe=None)
    fields.update(changes)
    return Sample(**fields)


def test_round_trip_through_json():
    state = sample()
    assert Sample.from_dict(json.loads(json.dumps(state.to_dict()))) == state


@given(count=st.integers(0, 255), fifo=st.lists(st.integers(0, 255), max_size=16), data=st.binary(max_size=64),
       maybe=st.none() | st.integers())
def test_any_valid_state_round_trips(count, fifo, data, maybe):
    state = sample(count=count, fifo=tuple(fifo), inner=Inner(False, data), maybe=maybe)
    assert Sample.from_dict(json.loads(json.dumps(state.to_dict()))) == state


@pytest.mark.parametrize("changes, message", [
    (dict(count=256), "sample state: count: 256 is outside 0..255"),
    (dict(count=True), "sample.count: expected int, got bool"),
    (dict(fifo=tuple(range(17))), "sample state: fifo: 17 bytes, at most 16"),
    (dict(fifo=[1]), "sample.fifo: expected a tuple"),
    (dict(pair=(1,)), "sample.pair: expected 2 items"),
    (dict(maybe="3"), "sample.maybe: '3' is not"),
    (dict(table={"5": Inner(False, b"")}), "sample.table key: expected int"),
])
def test_a_bad_value_is_refused_naming_the_field(changes, message):
    with pytest.raises(StateError) as caught:
        sample(**changes)
    assert message in str(caught.value)
    assert isinstance(caught.value, UserError)


def _tampered(edit) -> dict:
    data = json.loads(json.dumps(sample().to_dict()))
    edit(data)
    return data


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(kind="other"), "this is a 'other' state"),
    (lambda d: d.update(version=3), "version 3 is not supported"),
    (lambda d: d.update(version="2"), "version '2' is not supported"),
    (lambda d: d.update(version=1), "version 1 is not supported"),
    (lambda d: d["fields"].pop("name"), "missing field name"),
    (lambda d: d["fields"].update(extra=1), "unknown field extra"),
    (lambda d: d["fields"]["inner"]["fields"].update(data="***"), "inner.data: not valid base64"),
    (lambda d: d["fields"]["inner"]["fields"].update(level=1), "inner.level: expected bool"),
    (lambda d: d["fields"].update(count=-1), "count: -1 is outside"),
    (lambda d: d.pop("fields"), "expected an object with kind, version and fields"),
])
def test_a_tampered_serialised_state_is_refused(edit, message):
    with pytest.raises(StateError, match=message):
        Sample.from_dict(_tampered(edit))


def test_an_older_version_is_read_through_upgrade():
    @dataclasses.dataclass(frozen=True)
    class Counter(State):
        KIND = "counter"
        VERSION = 2
        value: int
        step: int

        @classmethod
        def upgrade(cls, version, fields):
            return {**fields, "step": 1}  # version 1 had no step

    assert Counter.from_dict({"kind": "counter", "version": 1, "fields": {"value": 4}}) == Counter(4, 1)


def test_mask_and_item_checks_name_the_field():
    @dataclasses.dataclass(frozen=True)
    class Registers(State):
        KIND = "registers"
        flags: int
        values: tuple[int, ...]

        def validate(self) -> None:
            self.check_mask("flags", 0x0F)
            self.check_items("values", 0, 255)

    Registers(0x0F, (0, 255))
    with pytest.raises(StateError, match="registers state: flags: 0x10 has bits outside 0xf"):
        Registers(0x10, ())
    with pytest.raises(StateError, match="registers state: flags: -0x1 has bits"):
        Registers(-1, ())
    with pytest.raises(StateError, match=r"registers state: values\[1\]: 256 is outside 0..255"):
        Registers(0, (0, 256))


def test_a_field_of_a_base_state_type_reads_back_by_kind():
    @dataclasses.dataclass(frozen=True)
    class Holder(State):
        KIND = "holder"
        part: State

    holder = Holder(part=Inner(True, b"x"))
    assert Holder.from_dict(json.loads(json.dumps(holder.to_dict()))) == holder
    data = holder.to_dict()
    data["fields"]["part"]["kind"] = "no-such-kind"
    with pytest.raises(StateError, match="holder.part: a 'no-such-kind' state is not a state state"):
        Holder.from_dict(data)
    with pytest.raises(StateError, match="holder.part: expected State"):
        Holder(part=3)


def test_a_kind_names_one_state_class():
    with pytest.raises(TypeError, match="state kind 'inner' is taken by test_persist.Inner"):
        @dataclasses.dataclass(frozen=True)
        class Impostor(State):
            KIND = "inner"
