"""Decode the operands of an x86 instruction that takes a ModRM byte.

Enough of the instruction format (Intel SDM vol. 2, ch. 2) to complete an
instruction outside the CPU: legacy prefixes, REX, the opcode (one byte, 0F xx,
0F 38 xx, 0F 3A xx), ModRM, SIB and the displacement, in 16-, 32- and 64-bit
code. It does not know opcodes: the caller says which instruction it expects
(and how many immediate bytes follow), and gets the operand sizes, the
register fields and the memory operand, with its effective address computed
from the guest's registers (RIP-relative included). VEX/EVEX encodings are not
decoded (a VEX-encoded instruction is not the one a caller expects, so
the caller's opcode check rejects it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ...errors import PyvmmError

MAX_LENGTH = 15

SEGMENT_PREFIXES = {0x26: "es", 0x2E: "cs", 0x36: "ss", 0x3E: "ds", 0x64: "fs", 0x65: "gs"}
OPERAND_SIZE_PREFIX = 0x66
ADDRESS_SIZE_PREFIX = 0x67
LOCK_PREFIX = 0xF0
REPNE_PREFIX = 0xF2
REP_PREFIX = 0xF3
LEGACY_PREFIXES = frozenset({*SEGMENT_PREFIXES, OPERAND_SIZE_PREFIX, ADDRESS_SIZE_PREFIX,
                             LOCK_PREFIX, REPNE_PREFIX, REP_PREFIX})

# General-purpose registers in encoding order (ModRM.reg/rm, SIB.base/index, plus REX.R/X/B).
GPR_ENCODING = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
                "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
RSP, RBP, RSI, RDI, RBX = 4, 5, 6, 7, 3

# 16-bit addressing: ModRM.rm -> (base, index); rm 6 with mod 0 is a bare disp16.
_ADDRESSING_16 = ((RBX, RSI), (RBX, RDI), (RBP, RSI), (RBP, RDI), (RSI, None), (RDI, None), (RBP, None), (RBX, None))


class DecodeError(PyvmmError, ValueError):
    """The bytes are not a complete instruction of the expected form."""


@dataclass(frozen=True)
class MemoryOperand:
    """A ModRM memory operand: segment:[base + index * scale + displacement]."""

    segment: str                  # the effective segment: an override prefix, or ds / ss by default
    base: int | None              # register number (GPR_ENCODING), None for none
    index: int | None
    scale: int                    # 1, 2, 4, 8
    displacement: int             # signed
    address_size: int             # 16, 32 or 64: the effective address wraps at this width
    rip_relative: bool = False

    def offset(self, gpr: Callable[[int], int], next_rip: int) -> int:
        """The effective address (the offset within the segment), from the register values
        `gpr(number)` returns and the address of the next instruction (RIP-relative)."""
        value = self.displacement
        if self.rip_relative:
            value += next_rip
        if self.base is not None:
            value += gpr(self.base)
        if self.index is not None:
            value += gpr(self.index) * self.scale
        return value & ((1 << self.address_size) - 1)

    def describe(self) -> str:
        parts = []
        if self.rip_relative:
            parts.append("rip")
        if self.base is not None:
            parts.append(GPR_ENCODING[self.base])
        if self.index is not None:
            parts.append(f"{GPR_ENCODING[self.index]}*{self.scale}")
        if self.displacement or not parts:
            parts.append(f"{self.displacement:#x}")
        return f"{self.segment}:[{'+'.join(parts)}]"


@dataclass(frozen=True)
class Instruction:
    length: int
    prefixes: tuple[int, ...]     # legacy prefixes, in order
    rex: int                      # the REX byte (0x40-0x4F) in effect, 0 without one
    opcode: bytes                 # 0F B8, 0F 00, ...
    mod: int
    reg: int                      # ModRM.reg, extended by REX.R (or the opcode extension /digit)
    rm: int                       # ModRM.rm, extended by REX.B (a register when mod == 3)
    operand_size: int             # 16, 32 or 64
    address_size: int             # 16, 32 or 64
    memory: MemoryOperand | None  # None when the r/m operand is a register

    @property
    def lock(self) -> bool:
        return LOCK_PREFIX in self.prefixes

    @property
    def rep(self) -> bool:
        return REP_PREFIX in self.prefixes

    @property
    def repne(self) -> bool:
        return REPNE_PREFIX in self.prefixes

    @property
    def operand_size_prefix(self) -> bool:
        return OPERAND_SIZE_PREFIX in self.prefixes


def decode_modrm(code: bytes, code_size: int, *, immediate_size: int = 0) -> Instruction:
    """Decode the instruction at the start of `code`, one known to take a ModRM byte followed
    by `immediate_size` immediate bytes, executed as `code_size` (16, 32 or 64) code."""
    if code_size not in (16, 32, 64):
        raise ValueError(f"code size must be 16, 32 or 64, not {code_size!r}")
    pos, prefixes, rex = 0, [], 0
    while True:
        byte = _byte(code, pos)
        if byte in LEGACY_PREFIXES:
            prefixes.append(byte)
            rex = 0  # a REX prefix followed by a legacy prefix is ignored
        elif code_size == 64 and 0x40 <= byte <= 0x4F:
            rex = byte
        else:
            break
        pos += 1
    opcode_start = pos
    if _byte(code, pos) == 0x0F:
        pos += 1
        if _byte(code, pos) in (0x38, 0x3A):
            pos += 1
    pos += 1
    opcode = bytes(code[opcode_start:pos])

    rex_w, rex_r, rex_x, rex_b = (rex >> 3 & 1, rex >> 2 & 1, rex >> 1 & 1, rex & 1)
    default_size = 16 if code_size == 16 else 32
    if rex_w:
        operand_size = 64
    elif OPERAND_SIZE_PREFIX in prefixes:
        operand_size = 32 if default_size == 16 else 16
    else:
        operand_size = default_size
    if ADDRESS_SIZE_PREFIX in prefixes:
        address_size = {16: 32, 32: 16, 64: 32}[code_size]
    else:
        address_size = code_size

    modrm = _byte(code, pos)
    pos += 1
    mod, reg, rm = modrm >> 6, (modrm >> 3 & 7) | rex_r << 3, modrm & 7
    memory = None
    if mod == 3:
        rm |= rex_b << 3
    elif address_size == 16:
        memory, pos = _memory_16(code, pos, mod, rm)
        rm = rm | rex_b << 3
    else:
        memory, pos = _memory_32_64(code, pos, mod, rm, rex_x, rex_b, address_size, code_size)
        rm = rm | rex_b << 3
    if memory is not None:
        override = [SEGMENT_PREFIXES[p] for p in prefixes if p in SEGMENT_PREFIXES]
        if override:
            memory = _with_segment(memory, override[-1])  # the last segment prefix wins
    pos += immediate_size
    if pos > MAX_LENGTH:
        raise DecodeError(f"instruction longer than {MAX_LENGTH} bytes")
    if pos > len(code):
        raise DecodeError(f"instruction truncated ({len(code)} of {pos} bytes)")
    return Instruction(pos, tuple(prefixes), rex, opcode, mod, reg, rm, operand_size, address_size, memory)


def _byte(code: bytes, pos: int) -> int:
    if pos >= MAX_LENGTH:
        raise DecodeError(f"instruction longer than {MAX_LENGTH} bytes")
    if pos >= len(code):
        raise DecodeError(f"instruction truncated after {len(code)} bytes")
    return code[pos]


def _signed(code: bytes, pos: int, size: int) -> int:
    for i in range(size):
        _byte(code, pos + i)
    return int.from_bytes(code[pos:pos + size], "little", signed=True)


def _memory_16(code: bytes, pos: int, mod: int, rm: int) -> tuple[MemoryOperand, int]:
    if mod == 0 and rm == 6:
        return MemoryOperand("ds", None, None, 1, _signed(code, pos, 2), 16), pos + 2
    base, index = _ADDRESSING_16[rm]
    size = {0: 0, 1: 1, 2: 2}[mod]
    displacement = _signed(code, pos, size) if size else 0
    segment = "ss" if base == RBP else "ds"
    return MemoryOperand(segment, base, index, 1, displacement, 16), pos + size


def _memory_32_64(code: bytes, pos: int, mod: int, rm: int, rex_x: int, rex_b: int,
                  address_size: int, code_size: int) -> tuple[MemoryOperand, int]:
    base: int | None
    index: int | None = None
    scale = 1
    if rm == 4:  # a SIB byte follows
        sib = _byte(code, pos)
        pos += 1
        scale = 1 << (sib >> 6)
        index = (sib >> 3 & 7) | rex_x << 3
        if index == RSP:  # index 100b without REX.X: no index
            index, scale = None, 1
        base_low = sib & 7
        if base_low == RBP and mod == 0:  # no base, disp32
            displacement = _signed(code, pos, 4)
            return MemoryOperand("ds", None, index, scale, displacement, address_size), pos + 4
        base = base_low | rex_b << 3
    elif rm == 5 and mod == 0:  # disp32: RIP-relative in 64-bit code, absolute otherwise
        displacement = _signed(code, pos, 4)
        if code_size == 64:
            return MemoryOperand("ds", None, None, 1, displacement, address_size, rip_relative=True), pos + 4
        return MemoryOperand("ds", None, None, 1, displacement, address_size), pos + 4
    else:
        base = rm | rex_b << 3
    size = {0: 0, 1: 1, 2: 4}[mod]
    displacement = _signed(code, pos, size) if size else 0
    # SS is the default segment for a base of rSP or rBP (not r12/r13: those need REX.B)
    segment = "ss" if base in (RSP, RBP) else "ds"
    return MemoryOperand(segment, base, index, scale, displacement, address_size), pos + size


def _with_segment(memory: MemoryOperand, segment: str) -> MemoryOperand:
    return MemoryOperand(segment, memory.base, memory.index, memory.scale, memory.displacement,
                         memory.address_size, memory.rip_relative)
