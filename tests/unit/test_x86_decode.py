"""The ModRM decoder (src/pyvmm/arch/x86_64/decode.py), against hand-checked encodings and
against GNU as: hundreds of operand forms assembled by binutils must decode to the operand
that was written, with the length the assembler gave the instruction."""

from __future__ import annotations

import random
import shutil
import subprocess

import pytest

from pyvmm.arch.x86_64.decode import GPR_ENCODING, DecodeError, MemoryOperand, decode_modrm

REGS64 = {name: i for i, name in enumerate(GPR_ENCODING)}
REGS32 = {"eax": 0, "ecx": 1, "edx": 2, "ebx": 3, "esp": 4, "ebp": 5, "esi": 6, "edi": 7}


# --- hand-checked encodings ---------------------------------------------------------------------

def test_register_form_with_rex():
    insn = decode_modrm(bytes.fromhex("f3480fb8c3"), 64)     # popcnt %rbx, %rax
    assert (insn.length, insn.opcode, insn.mod, insn.reg, insn.rm) == (5, b"\x0f\xb8", 3, 0, 3)
    assert insn.operand_size == 64 and insn.memory is None and insn.rep and insn.rex == 0x48
    insn = decode_modrm(bytes.fromhex("f34d0fb8c7"), 64)     # popcnt %r15, %r8 (REX.WRB)
    assert (insn.reg, insn.rm, insn.operand_size) == (8, 15, 64)


def test_operand_size_prefix_and_rex_w():
    assert decode_modrm(bytes.fromhex("66f30fb8c3"), 64).operand_size == 16
    assert decode_modrm(bytes.fromhex("f30fb8c3"), 64).operand_size == 32
    assert decode_modrm(bytes.fromhex("66f3480fb8c3"), 64).operand_size == 64   # REX.W wins over 66
    assert decode_modrm(bytes.fromhex("f30fb8c3"), 16).operand_size == 16
    assert decode_modrm(bytes.fromhex("66f30fb8c3"), 16).operand_size == 32
    assert decode_modrm(bytes.fromhex("66f30fb8c3"), 32).operand_size == 16


def test_rip_relative():
    insn = decode_modrm(bytes.fromhex("f30fb80d620f0000"), 64)    # popcnt 0xf62(%rip), %ecx
    assert insn.length == 8 and insn.reg == 1
    assert insn.memory == MemoryOperand("ds", None, None, 1, 0xF62, 64, rip_relative=True)
    assert insn.memory.offset(lambda n: 0, next_rip=0x1000) == 0x1F62
    # the same ModRM in 32-bit code is an absolute disp32
    assert decode_modrm(bytes.fromhex("f30fb80d620f0000"), 32).memory == MemoryOperand("ds", None, None, 1, 0xF62, 32)
    # REX.B does not turn rm=101/mod=00 into r13: still RIP-relative
    assert decode_modrm(bytes.fromhex("f3410fb80d00000000"), 64).memory.rip_relative


def test_sib_forms():
    # popcnt 8(%rdi,%rax,8), %rcx
    insn = decode_modrm(bytes.fromhex("f3480fb84cc708"), 64)
    assert insn.length == 7
    assert insn.memory == MemoryOperand("ds", REGS64["rdi"], REGS64["rax"], 8, 8, 64)
    # no index (SIB.index = 100 without REX.X): (%rsp) -> SS
    assert decode_modrm(bytes.fromhex("f30fb80c24"), 64).memory == MemoryOperand("ss", REGS64["rsp"], None, 1, 0, 64)
    # REX.X makes index 100 r12, a real index
    assert decode_modrm(bytes.fromhex("f3420fb80c20"), 64).memory == MemoryOperand("ds", 0, 12, 1, 0, 64)
    # no base (SIB.base = 101, mod 00): disp32 + index*scale, whatever REX.B says
    assert decode_modrm(bytes.fromhex("f3410fb80c8d78563412"), 64).memory == MemoryOperand(
        "ds", None, 1, 4, 0x12345678, 64)


def test_rbp_and_r13_need_a_displacement():
    assert decode_modrm(bytes.fromhex("f30fb84d00"), 64).memory == MemoryOperand("ss", 5, None, 1, 0, 64)   # 0(%rbp)
    assert decode_modrm(bytes.fromhex("f3410fb84d00"), 64).memory == MemoryOperand("ds", 13, None, 1, 0, 64)  # 0(%r13)


def test_negative_displacements_and_wrapping():
    insn = decode_modrm(bytes.fromhex("f30fb848f0"), 64)       # popcnt -0x10(%rax), %ecx
    assert insn.memory.displacement == -0x10
    assert insn.memory.offset(lambda n: 8, 0) == (8 - 0x10) & (1 << 64) - 1
    insn = decode_modrm(bytes.fromhex("67f30fb848f0"), 64)     # addr32: wraps at 32 bits
    assert insn.address_size == 32
    assert insn.memory.offset(lambda n: 0xFFFFFFFF_00000008, 0) == (8 - 0x10) & 0xFFFFFFFF


def test_segment_overrides():
    assert decode_modrm(bytes.fromhex("64f30fb808"), 64).memory.segment == "fs"
    assert decode_modrm(bytes.fromhex("65f30fb808"), 64).memory.segment == "gs"
    assert decode_modrm(bytes.fromhex("6465f30fb808"), 64).memory.segment == "gs"   # the last one wins
    assert decode_modrm(bytes.fromhex("3ef30fb80424"), 64).memory.segment == "ds"   # overrides SS default


@pytest.mark.parametrize("rm, mod, tail, base, index, disp, segment", [
    (0, 0, "", "rbx", "rsi", 0, "ds"), (1, 0, "", "rbx", "rdi", 0, "ds"),
    (2, 0, "", "rbp", "rsi", 0, "ss"), (3, 0, "", "rbp", "rdi", 0, "ss"),
    (4, 1, "7f", "rsi", None, 0x7F, "ds"), (5, 1, "80", "rdi", None, -0x80, "ds"),
    (6, 0, "3412", None, None, 0x1234, "ds"), (6, 2, "3412", "rbp", None, 0x1234, "ss"),
    (7, 2, "fcff", "rbx", None, -4, "ds"),
])
def test_16_bit_addressing(rm, mod, tail, base, index, disp, segment):
    code = bytes.fromhex("f30fb8") + bytes([mod << 6 | 1 << 3 | rm]) + bytes.fromhex(tail)
    insn = decode_modrm(code, 16)
    assert insn.length == len(code) and insn.address_size == 16 and insn.reg == 1
    expected = MemoryOperand(segment, REGS64.get(base), REGS64.get(index), 1, disp, 16)
    assert insn.memory == expected
    values = {REGS64["rbx"]: 0xF000, REGS64["rbp"]: 0x100, REGS64["rsi"]: 0x20, REGS64["rdi"]: 0x3}
    assert insn.memory.offset(lambda n: values[n], 0) == (
        values.get(REGS64.get(base), 0) + values.get(REGS64.get(index), 0) + disp) & 0xFFFF


def test_address_size_prefix_in_32_and_16_bit_code():
    assert decode_modrm(bytes.fromhex("67f30fb807"), 32).memory == MemoryOperand("ds", REGS64["rbx"], None, 1, 0, 16)
    assert decode_modrm(bytes.fromhex("67f30fb807"), 16).memory == MemoryOperand("ds", REGS64["rdi"], None, 1, 0, 32)


def test_rex_is_only_a_prefix_in_64_bit_code_and_only_right_before_the_opcode():
    assert decode_modrm(bytes.fromhex("48f30fb8c3"), 64).rex == 0         # REX then a legacy prefix: ignored
    assert decode_modrm(bytes.fromhex("48f30fb8c3"), 64).operand_size == 32
    # in 32-bit code 0x48 is `dec %eax`, an opcode: a caller expecting 0F B8 sees it is not popcnt
    assert decode_modrm(bytes.fromhex("480fb8c3"), 32).opcode == b"\x48"


def test_immediate_bytes_count_in_the_length():
    insn = decode_modrm(bytes.fromhex("660f3a44c100"), 64, immediate_size=1)   # pclmulqdq $0, %xmm1, %xmm0
    assert insn.opcode == b"\x0f\x3a\x44" and insn.length == 6


def test_group_opcode_extension():
    insn = decode_modrm(bytes.fromhex("0f002d420b0000"), 64)   # verw 0xb42(%rip)
    assert insn.opcode == b"\x0f\x00" and insn.reg == 5 and insn.length == 7 and insn.memory.rip_relative
    insn = decode_modrm(bytes.fromhex("0f00e8"), 64)           # verw %ax
    assert (insn.reg, insn.mod, insn.rm, insn.length) == (5, 3, 0, 3)


@pytest.mark.parametrize("code", [b"", b"\xf3", b"\xf3\x0f", b"\xf3\x0f\xb8", b"\xf3\x0f\xb8\x04",
                                  b"\xf3\x0f\xb8\x80\x00\x00", b"\xf3\x0f\xb8\x05\x00\x00\x00"])
def test_truncated_instructions(code):
    with pytest.raises(DecodeError, match="truncated"):
        decode_modrm(code, 64)


def test_longer_than_15_bytes():
    with pytest.raises(DecodeError, match="15"):
        decode_modrm(b"\x66" * 14 + b"\xf3\x0f\xb8\xc3", 64)
    assert decode_modrm(b"\x66" * 11 + b"\xf3\x0f\xb8\xc3", 64).length == 15
    with pytest.raises(DecodeError, match="15"):
        decode_modrm(b"\x66" * 10 + bytes.fromhex("f30fb880") + b"\0" * 4, 64)   # 18 bytes with disp32


def test_bad_code_size():
    with pytest.raises(ValueError):
        decode_modrm(b"\x0f\xb8\xc3", 8)


# --- against GNU as --------------------------------------------------------------------------------

def _assemble(lines: list[str], bits: int, tmp_path) -> tuple[bytes, dict[str, int]]:
    """Assemble `lines` (label i before line i); return the .text bytes and label offsets."""
    source = tmp_path / "t.S"
    source.write_text(f".code{bits}\n.text\n" + "".join(f"L{i}: {line}\n" for i, line in enumerate(lines))
                      + f"L{len(lines)}:\n")
    obj, binary = tmp_path / "t.o", tmp_path / "t.bin"
    subprocess.run(["as", "--64", "-o", str(obj), str(source)], check=True, capture_output=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(binary)], check=True)
    symbols = subprocess.run(["nm", str(obj)], check=True, capture_output=True, text=True).stdout
    labels = {}
    for line in symbols.splitlines():
        address, _, name = line.split()
        labels[name] = int(address, 16)
    return binary.read_bytes(), labels


def _random_operand(rng: random.Random, bits: int):
    """(AT&T text, expected MemoryOperand minus the segment, register values it uses)."""
    names = list(REGS64) if bits == 64 else list(REGS32)
    prefix = "%"
    base = rng.choice(names + [None])
    index = rng.choice([n for n in names if n not in ("rsp", "esp")] + [None])
    scale = rng.choice([1, 2, 4, 8])
    disp = rng.choice([0, 1, -1, 0x7F, -0x80, 0x80, 0x12345, -0x54321, rng.randrange(-2**31, 2**31)])
    if base is None and index is None:  # an absolute disp32 (64-bit code would make it SIB-encoded: skipped)
        if bits == 64:
            return None, None
        return f"{disp & 0xFFFFFFFF:#x}", MemoryOperand("ds", None, None, 1, disp, 32)
    text = f"{disp}(" + (prefix + base if base else "") + (f",{prefix}{index},{scale}" if index else "") + ")"
    number = (lambda n: REGS64[n]) if bits == 64 else (lambda n: REGS32[n])
    default_ss = base is not None and number(base) in (4, 5)
    operand = MemoryOperand("ss" if default_ss else "ds", number(base) if base else None,
                            number(index) if index else None, scale if index else 1, disp, bits)
    return text, operand


@pytest.mark.parametrize("bits", [64, 32])
def test_popcnt_and_verw_operands_match_the_assembler(bits, tmp_path):
    if not shutil.which("as"):
        pytest.fail("GNU as is needed (binutils)")
    rng = random.Random(bits)
    cases = []
    while len(cases) < 300:
        text, operand = _random_operand(rng, bits)
        if text is None:
            continue
        seg = rng.choice(["", "%fs:", "%gs:", "%ss:"])
        if seg:
            operand = MemoryOperand(seg[1:3], operand.base, operand.index, operand.scale, operand.displacement,
                                    operand.address_size)
        kind = rng.choice(["popcntw", "popcntl", "popcntq" if bits == 64 else "popcntl", "verw"])
        dest = rng.choice(list(REGS64)[:16] if bits == 64 else list(REGS32))
        if kind == "verw":
            line, reg, size = f"verw {seg}{text}", 5, 16
        else:
            size = {"popcntw": 16, "popcntl": 32, "popcntq": 64}[kind]
            reg = REGS64[dest] if bits == 64 else REGS32[dest]
            reg_name = dest if size == 64 or bits == 32 and size == 32 else _sized(dest, size)
            line, size = f"{kind} {seg}{text}, %{reg_name}", size
        cases.append((line, operand, reg, size))
    code, labels = _assemble([c[0] for c in cases], bits, tmp_path)
    for i, (line, operand, reg, size) in enumerate(cases):
        start, end = labels[f"L{i}"], labels[f"L{i + 1}"]
        insn = decode_modrm(code[start:start + 15], bits)
        assert insn.length == end - start, line
        assert insn.memory == operand, line
        if line.startswith("verw"):
            assert (insn.opcode, insn.reg & 7) == (b"\x0f\x00", 5), line
        else:
            assert (insn.opcode, insn.reg, insn.operand_size, insn.rep) == (b"\x0f\xb8", reg, size, True), line
        values = {n: rng.randrange(2**64) for n in range(16)}
        expected = operand.displacement + (values[operand.base] if operand.base is not None else 0) + (
            values[operand.index] * operand.scale if operand.index is not None else 0)
        assert insn.memory.offset(values.__getitem__, 0) == expected & ((1 << bits) - 1), line


def _sized(reg64: str, size: int) -> str:
    if reg64.startswith("r") and reg64[1:].isdigit():
        return reg64 + {16: "w", 32: "d"}[size]
    return {16: reg64[1:], 32: "e" + reg64[1:]}[size]


def test_rip_relative_operands_match_the_assembler(tmp_path):
    lines = [f"popcntq {d}(%rip), %r9" for d in (0, 8, -8, 0x7FFFFFF0, -0x80000000)]
    lines += [f"popcntl %fs:{d}(%rip), %eax" for d in (0x100, -0x100)]
    code, labels = _assemble(lines, 64, tmp_path)
    for i, line in enumerate(lines):
        start, end = labels[f"L{i}"], labels[f"L{i + 1}"]
        insn = decode_modrm(code[start:end], 64)
        assert insn.length == end - start and insn.memory.rip_relative, line
        disp = int(line.split()[1].split("(")[0].removeprefix("%fs:"), 0)
        assert insn.memory.displacement == disp and insn.memory.segment == ("fs" if "%fs" in line else "ds"), line
