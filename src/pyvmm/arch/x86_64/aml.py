"""A minimal AML (ACPI Machine Language) encoder: enough for a VMM's DSDT.

Every builder returns the encoded bytes of one AML term, so terms compose by
concatenation: ``device("COM1", [name("_HID", eisa_id("PNP0501")), ...])``.
Data arguments may be given as Python values: an ``int`` becomes the smallest
integer encoding, a ``str`` an AML String, ``bytes`` are taken as already
encoded AML. Grammar references are to the ACPI 6.5 spec, chapter 20
("ACPI Machine Language Specification") and 6.4 ("Resource Data Types").
"""

from __future__ import annotations

import logging
import struct
from typing import Iterable, Union

from ...errors import PyvmmError

log = logging.getLogger(__name__)

# Opcodes (ACPI 6.5, 20.3).
ZERO_OP = 0x00
ONE_OP = 0x01
ONES_OP = 0xFF
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
METHOD_OP = 0x14
RETURN_OP = 0xA4
STORE_OP = 0x70
AND_OP = 0x7B
NOTIFY_OP = 0x86
LEQUAL_OP = 0x93
IF_OP = 0xA0
LOCAL0_OP = 0x60  # Local0-Local7: 0x60-0x67
ARG0_OP = 0x68    # Arg0-Arg6: 0x68-0x6E
EXT_OP_PREFIX = 0x5B
OP_REGION_OP = 0x80  # after EXT_OP_PREFIX
FIELD_OP = 0x81      # after EXT_OP_PREFIX
DEVICE_OP = 0x82  # after EXT_OP_PREFIX
ROOT_CHAR = 0x5C  # '\'
PARENT_PREFIX_CHAR = 0x5E  # '^'
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
NULL_NAME = 0x00

PKG_LENGTH_MAX = (1 << 28) - 1

DataObject = Union[int, str, bytes]


class AmlError(PyvmmError, ValueError):
    """A value that has no AML encoding (bad name, integer out of range, ...)."""


# --- names ------------------------------------------------------------------------------

_LEAD_CHARS = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_NAME_CHARS = _LEAD_CHARS | set(b"0123456789")


def name_seg(seg: str) -> bytes:
    """A NameSeg: 4 characters, shorter names padded with '_' as ASL does ("_S5" -> "_S5_")."""
    raw = seg.encode("ascii", errors="replace")
    if not 1 <= len(raw) <= 4:
        raise AmlError(f"AML name segment must be 1-4 characters: {seg!r}")
    raw = raw.ljust(4, b"_")
    if raw[0] not in _LEAD_CHARS or any(c not in _NAME_CHARS for c in raw[1:]):
        raise AmlError(f"invalid AML name segment {seg!r} (A-Z, 0-9, '_'; no leading digit)")
    return raw


def name_string(path: str) -> bytes:
    r"""A NameString: optional '\' or '^'s, then zero or more dot-separated NameSegs."""
    prefix = b""
    rest = path
    if rest.startswith("\\"):
        prefix, rest = b"\\", rest[1:]
    else:
        while rest.startswith("^"):
            prefix += b"^"
            rest = rest[1:]
    segs = [name_seg(s) for s in rest.split(".")] if rest else []
    if not segs:
        if not prefix:
            raise AmlError("empty AML name")
        return prefix + bytes([NULL_NAME])
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + segs[0] + segs[1]
    if len(segs) > 255:
        raise AmlError(f"AML name has too many segments: {path!r}")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


# --- package length ----------------------------------------------------------------------


def pkg_length(payload_len: int) -> bytes:
    """The PkgLength of a payload of `payload_len` bytes (20.2.4).

    The encoded length counts the PkgLength bytes themselves, so the number of
    bytes is chosen for the total: 1 byte up to 63, 2 up to 4095, 3 up to 2^20-1,
    4 up to 2^28-1. Multi-byte forms keep the low nibble in byte 0 (bits 0-3) and
    the byte count - 1 in bits 6-7.
    """
    if payload_len < 0:
        raise AmlError(f"negative AML package length {payload_len}")
    for extra, limit in ((0, 1 << 6), (1, 1 << 12), (2, 1 << 20), (3, 1 << 28)):
        total = payload_len + 1 + extra
        if total < limit:
            if extra == 0:
                return bytes([total])
            tail = (total >> 4).to_bytes(extra, "little")
            return bytes([(extra << 6) | (total & 0x0F)]) + tail
    raise AmlError(f"AML package too long: {payload_len} bytes")


def _with_pkg_length(opcode: bytes, payload: bytes) -> bytes:
    return opcode + pkg_length(len(payload)) + payload


# --- data objects ------------------------------------------------------------------------


def integer(value: int) -> bytes:
    """The shortest integer encoding: ZeroOp, OneOp, or a Byte/Word/DWord/QWord prefix."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise AmlError(f"AML integer expected, got {value!r}")
    if value < 0 or value >= 1 << 64:
        raise AmlError(f"AML integer out of range: {value}")
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    if value <= 0xFF:
        return bytes([BYTE_PREFIX, value])
    if value <= 0xFFFF:
        return bytes([WORD_PREFIX]) + struct.pack("<H", value)
    if value <= 0xFFFFFFFF:
        return bytes([DWORD_PREFIX]) + struct.pack("<I", value)
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", value)


def ones() -> bytes:
    """OnesOp: all bits set (0xFFFFFFFFFFFFFFFF in a revision-2 table)."""
    return bytes([ONES_OP])


def string(text: str) -> bytes:
    """A String: ASCII 0x01-0x7F, NUL-terminated."""
    raw = text.encode("ascii")
    if b"\0" in raw:
        raise AmlError("AML strings cannot contain NUL")
    return bytes([STRING_PREFIX]) + raw + b"\0"


def eisa_id_value(eisa: str) -> int:
    """The 32-bit value of EISAID("PNP0501") as ASL computes it (0x0105D041).

    Three letters in 5 bits each (A=1) and four hex digits, stored big-endian,
    so the little-endian DWord the interpreter reads is byte-swapped.
    """
    if len(eisa) != 7 or not eisa[:3].isalpha() or not eisa[:3].isupper():
        raise AmlError(f"EISA ID must be 3 upper-case letters and 4 hex digits: {eisa!r}")
    try:
        product = int(eisa[3:], 16)
    except ValueError:
        raise AmlError(f"EISA ID must end in 4 hex digits: {eisa!r}") from None
    vendor = 0
    for ch in eisa[:3]:
        vendor = (vendor << 5) | (ord(ch) - 0x40)
    return int.from_bytes(((vendor << 16) | product).to_bytes(4, "big"), "little")


def eisa_id(eisa: str) -> bytes:
    """EISAID("PNP0501") as an AML integer (always a DWord, like iasl emits it)."""
    return bytes([DWORD_PREFIX]) + struct.pack("<I", eisa_id_value(eisa))


def data(value: DataObject) -> bytes:
    """Encode a Python value as a DataRefObject; bytes are passed through as encoded AML."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return string(value)
    return integer(value)


def package(elements: Iterable[DataObject]) -> bytes:
    """Package(){...}: PackageOp PkgLength NumElements PackageElementList."""
    items = [data(e) for e in elements]
    if len(items) > 255:
        raise AmlError("AML Package has more than 255 elements (VarPackage not supported)")
    return _with_pkg_length(bytes([PACKAGE_OP]), bytes([len(items)]) + b"".join(items))


def buffer(contents: bytes) -> bytes:
    """Buffer(){...}: BufferOp PkgLength BufferSize ByteList."""
    return _with_pkg_length(bytes([BUFFER_OP]), integer(len(contents)) + bytes(contents))


# --- named objects and scopes ---------------------------------------------------------------


def name(path: str, value: DataObject) -> bytes:
    """Name(path, value)."""
    return bytes([NAME_OP]) + name_string(path) + data(value)


def scope(path: str, terms: Iterable[bytes]) -> bytes:
    """Scope(path){terms}."""
    return _with_pkg_length(bytes([SCOPE_OP]), name_string(path) + b"".join(terms))


def device(path: str, terms: Iterable[bytes]) -> bytes:
    """Device(path){terms}."""
    return _with_pkg_length(bytes([EXT_OP_PREFIX, DEVICE_OP]), name_string(path) + b"".join(terms))


def method(path: str, args: int, terms: Iterable[bytes], *, serialized: bool = False, sync_level: int = 0) -> bytes:
    """Method(path, args, Serialized/NotSerialized, sync_level){terms}."""
    if not 0 <= args <= 7 or not 0 <= sync_level <= 15:
        raise AmlError("AML method takes 0-7 arguments and sync level 0-15")
    flags = args | (0x08 if serialized else 0) | (sync_level << 4)
    return _with_pkg_length(bytes([METHOD_OP]), name_string(path) + bytes([flags]) + b"".join(terms))


def return_(value: DataObject) -> bytes:
    """Return(value)."""
    return bytes([RETURN_OP]) + data(value)


# --- method bodies: arguments, locals, operators, control flow (20.2.5) --------------------------

Operand = Union[int, bytes]


def arg(index: int) -> bytes:
    """ArgN (0-6): a method's Nth argument."""
    if not 0 <= index <= 6:
        raise AmlError(f"AML methods have Arg0-Arg6, not Arg{index}")
    return bytes([ARG0_OP + index])


def local(index: int) -> bytes:
    """LocalN (0-7): a method's Nth local variable."""
    if not 0 <= index <= 7:
        raise AmlError(f"AML methods have Local0-Local7, not Local{index}")
    return bytes([LOCAL0_OP + index])


def reference(path: str) -> bytes:
    """A named object used as an operand or target (a NameString)."""
    return name_string(path)


def _operand(value: Operand) -> bytes:
    """A TermArg: an int becomes an integer constant, bytes are already-encoded AML."""
    return value if isinstance(value, bytes) else integer(value)


def store(source: Operand, target: bytes) -> bytes:
    """Store(source, target), ASL `target = source`."""
    return bytes([STORE_OP]) + _operand(source) + target


def and_(left: Operand, right: Operand, target: bytes = bytes([NULL_NAME])) -> bytes:
    """And(left, right, target): bitwise and; no target (NullName) when only the value is used."""
    return bytes([AND_OP]) + _operand(left) + _operand(right) + target


def lequal(left: Operand, right: Operand) -> bytes:
    """LEqual(left, right), ASL `left == right`."""
    return bytes([LEQUAL_OP]) + _operand(left) + _operand(right)


def if_(predicate: bytes, terms: Iterable[bytes]) -> bytes:
    """If(predicate){terms}."""
    return _with_pkg_length(bytes([IF_OP]), predicate + b"".join(terms))


def notify(path: str, value: Operand) -> bytes:
    """Notify(object, value): e.g. 0x80 on a power button device reports a press."""
    return bytes([NOTIFY_OP]) + name_string(path) + _operand(value)


# --- operation regions and fields (19.6.100, 19.6.48) ---------------------------------------------

REGION_SYSTEM_MEMORY = 0x00
REGION_SYSTEM_IO = 0x01
ACCESS_ANY, ACCESS_BYTE, ACCESS_WORD, ACCESS_DWORD, ACCESS_QWORD = range(5)
LOCK_RULE_NO_LOCK, LOCK_RULE_LOCK = 0, 1
UPDATE_PRESERVE, UPDATE_WRITE_AS_ONES, UPDATE_WRITE_AS_ZEROS = 0, 1, 2


def operation_region(path: str, space: int, offset: int, length: int) -> bytes:
    """OperationRegion(path, space, offset, length): `length` bytes at `offset` of an address
    space (REGION_SYSTEM_IO, REGION_SYSTEM_MEMORY, ...)."""
    if not 0 <= space <= 0xFF:
        raise AmlError(f"AML region space {space} out of range 0-255")
    return bytes([EXT_OP_PREFIX, OP_REGION_OP]) + name_string(path) + bytes([space]) + integer(offset) + integer(length)


def field(region: str, fields: Iterable[tuple[str, int]], *, access: int = ACCESS_ANY,
          lock: bool = False, update: int = UPDATE_PRESERVE) -> bytes:
    """Field(region, access, Lock|NoLock, update){name, bits, ...}: named fields laid out from
    bit 0 of the region; a name of "" is an unnamed gap (ASL `Offset`/`, bits`)."""
    if not 0 <= access <= 5 or not 0 <= update <= 2:
        raise AmlError("AML field access type 0-5 and update rule 0-2")
    flags = access | (LOCK_RULE_LOCK << 4 if lock else 0) | update << 5
    elements = b""
    for field_name, bits in fields:
        if not 0 < bits < 1 << 28:
            raise AmlError(f"AML field {field_name!r} of {bits} bits")
        # NamedField := NameSeg PkgLength, the "length" being the bit count itself (it does
        # not count its own bytes); a ReservedField is 0x00 then the same.
        head = name_seg(field_name) if field_name else bytes([0x00])
        elements += head + _field_length(bits)
    return _with_pkg_length(bytes([EXT_OP_PREFIX, FIELD_OP]), name_string(region) + bytes([flags]) + elements)


def _field_length(bits: int) -> bytes:
    """A PkgLength-encoded value that is not a package length (no self-inclusion)."""
    if bits < 1 << 6:
        return bytes([bits])
    for extra in (1, 2, 3):
        if bits < 1 << (4 + 8 * extra):
            return bytes([(extra << 6) | (bits & 0x0F)]) + (bits >> 4).to_bytes(extra, "little")
    raise AmlError(f"AML field length {bits} too large")


# --- resource templates (ACPI 6.5, 6.4) ---------------------------------------------------------

_SMALL_IRQ = 0x04
_SMALL_IO = 0x08
_SMALL_END = 0x0F
_LARGE_MEMORY32_FIXED = 0x86
_LARGE_EXTENDED_IRQ = 0x89


def _small(item: int, body: bytes) -> bytes:
    assert len(body) <= 7
    return bytes([(item << 3) | len(body)]) + body


def _large(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + struct.pack("<H", len(body)) + body


def _check(value: int, bits: int, what: str) -> int:
    if not 0 <= value < 1 << bits:
        raise AmlError(f"{what} {value:#x} does not fit in {bits} bits")
    return value


def io(minimum: int, maximum: int, alignment: int, length: int, *, decode16: bool = True) -> bytes:
    """IO(Decode16, min, max, alignment, length): an I/O port range descriptor (6.4.2.5)."""
    for v, w in ((minimum, "IO minimum"), (maximum, "IO maximum")):
        _check(v, 16, w)
    _check(alignment, 8, "IO alignment")
    _check(length, 8, "IO length")
    return _small(_SMALL_IO, struct.pack("<BHHBB", 1 if decode16 else 0, minimum, maximum, alignment, length))


def irq_no_flags(*irqs: int) -> bytes:
    """IRQNoFlags(){irqs}: a legacy ISA IRQ mask (edge, active high) (6.4.2.1)."""
    mask = 0
    for irq in irqs:
        mask |= 1 << _check(irq, 4, "ISA IRQ")
    return _small(_SMALL_IRQ, struct.pack("<H", mask))


def memory32_fixed(base: int, size: int, *, writable: bool = True) -> bytes:
    """Memory32Fixed(ReadWrite, base, size) (6.4.3.4)."""
    _check(base, 32, "Memory32Fixed base")
    _check(size, 32, "Memory32Fixed size")
    return _large(_LARGE_MEMORY32_FIXED, struct.pack("<BII", 1 if writable else 0, base, size))


def interrupt(
    *gsis: int,
    consumer: bool = True,
    edge: bool = True,
    active_low: bool = False,
    shared: bool = False,
    wake: bool = False,
) -> bytes:
    """Interrupt(ResourceConsumer, Edge|Level, ActiveHigh|ActiveLow, Exclusive|Shared){gsis}:
    the Extended Interrupt descriptor (6.4.3.6); the numbers are GSIs, not ISA IRQs."""
    if not 1 <= len(gsis) <= 255:
        raise AmlError("Interrupt() takes 1-255 interrupt numbers")
    flags = (consumer << 0) | (edge << 1) | (active_low << 2) | (shared << 3) | (wake << 4)
    body = bytes([flags, len(gsis)]) + b"".join(struct.pack("<I", _check(g, 32, "GSI")) for g in gsis)
    return _large(_LARGE_EXTENDED_IRQ, body)


# Address space descriptors (6.4.3.5): a bridge's windows in _CRS. The general flags hold
# producer/consumer (bit 0), subtractive decode (bit 1), min fixed (2), max fixed (3).
_LARGE_DWORD_ADDRESS = 0x87
_LARGE_WORD_ADDRESS = 0x88
_LARGE_QWORD_ADDRESS = 0x8A
ADDRESS_MEMORY, ADDRESS_IO, ADDRESS_BUS = 0, 1, 2
IO_RANGE_ENTIRE = 3
MEMORY_NON_CACHEABLE, MEMORY_CACHEABLE, MEMORY_WRITE_COMBINING, MEMORY_PREFETCHABLE = 0, 1, 2, 3


def _address_space(tag: int, width: int, resource_type: int, type_flags: int,
                   minimum: int, maximum: int, producer: bool) -> bytes:
    """An address space descriptor with fixed min and max, positive decode, granularity and
    translation 0, length = max - min + 1 (what iasl requires of a MinFixed/MaxFixed window)."""
    bits = 8 * width
    _check(minimum, bits, "address minimum")
    _check(maximum, bits, "address maximum")
    if maximum < minimum:
        raise AmlError(f"address range {minimum:#x}-{maximum:#x} is empty")
    general = 0x0C | (0 if producer else 1)
    fmt = {2: "H", 4: "I", 8: "Q"}[width]
    body = struct.pack(f"<BBB5{fmt}", resource_type, general, type_flags, 0, minimum, maximum, 0,
                       maximum - minimum + 1)
    return _large(tag, body)


def word_bus_number(minimum: int, maximum: int, *, producer: bool = True) -> bytes:
    """WordBusNumber(ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, min, max, 0, len)."""
    return _address_space(_LARGE_WORD_ADDRESS, 2, ADDRESS_BUS, 0, minimum, maximum, producer)


def word_io(minimum: int, maximum: int, *, producer: bool = True) -> bytes:
    """WordIO(ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0, min, max, 0, len)."""
    return _address_space(_LARGE_WORD_ADDRESS, 2, ADDRESS_IO, IO_RANGE_ENTIRE, minimum, maximum, producer)


def _memory_flags(cacheability: int, writable: bool) -> int:
    if not 0 <= cacheability <= 3:
        raise AmlError(f"memory cacheability {cacheability} out of range 0-3")
    return (1 if writable else 0) | cacheability << 1


def dword_memory(minimum: int, maximum: int, *, producer: bool = True,
                 cacheability: int = MEMORY_NON_CACHEABLE, writable: bool = True) -> bytes:
    """DWordMemory(ResourceProducer, PosDecode, MinFixed, MaxFixed, <cacheability>, ReadWrite,
    0, min, max, 0, len)."""
    return _address_space(_LARGE_DWORD_ADDRESS, 4, ADDRESS_MEMORY, _memory_flags(cacheability, writable),
                          minimum, maximum, producer)


def qword_memory(minimum: int, maximum: int, *, producer: bool = True,
                 cacheability: int = MEMORY_CACHEABLE, writable: bool = True) -> bytes:
    """QWordMemory(ResourceProducer, PosDecode, MinFixed, MaxFixed, <cacheability>, ReadWrite,
    0, min, max, 0, len)."""
    return _address_space(_LARGE_QWORD_ADDRESS, 8, ADDRESS_MEMORY, _memory_flags(cacheability, writable),
                          minimum, maximum, producer)


def end_tag() -> bytes:
    """The End Tag; checksum 0 means "treat the template as valid" (6.4.2.9)."""
    return _small(_SMALL_END, b"\0")


def resource_template(descriptors: Iterable[bytes]) -> bytes:
    """ResourceTemplate(){descriptors}: a Buffer holding the descriptors and an End Tag."""
    return buffer(b"".join(descriptors) + end_tag())
