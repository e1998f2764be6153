"""External interrupts delivered by the translator's own x86 code, without a trip through Python.

The scheduler decides between slices, in Python, that a vCPU takes an interrupt (IF set, no
STI/MOV SS shadow, the LAPIC's acknowledge), then pyvmm's Python delivery (delivery.py) pushed
the frame through the guest's page tables: about 100 us per interrupt. libunicorn still holds
QEMU's: its CPU loop takes a hardware interrupt when CPUState.interrupt_request has
CPU_INTERRUPT_HARD and the guest's IF and interrupt shadow allow it, and calls
do_interrupt_x86_hardirq(env, vector, is_hw=1), which delivers it through the IDT (gates,
privilege and stack switches, IST, real and protected modes; a fault while delivering unwinds
to the loop, which delivers that fault). Unicorn has no interrupt controller, so the loop asks
for vector 0. So `do_interrupt_x86_hardirq` is patched at its entry with a jump to a stub that
swaps in the vector pyvmm armed for that CPU, if any:

    stub:   if intno != 0 or is_hw != 1: go on as before the stub was put in
            look env up in the table of armed vectors (env, vector, keep_request)
            not found or not armed (-1): go on as before the stub was put in
            intno = vector, entry disarmed; keep_request: CPU_INTERRUPT_HARD set again
            run the function: its displaced first instructions, then jump back

"As before" is the interrupt-window exit (interrupt_window.py), which patched the same entry
through helper_patch.py first, or the function itself. `arm(vector)` fills the CPU's entry and
sets CPU_INTERRUPT_HARD; the next emu_start takes it before the first instruction (the scheduler
checked that the guest accepts it). `keep_request`: the scheduler also asked for an
interrupt-window exit (another interrupt pending), whose request the delivery would consume.
The displaced instructions, and the instruction of x86_cpu_exec_interrupt that names
interrupt_request's offset, are checked byte for byte against the build pyvmm knows; a probe
guest then checks the whole path before it is used. Anything else: None, and the caller
delivers in Python.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import struct
import threading

from . import helper_patch, interrupt_window

log = logging.getLogger(__name__)

HARDIRQ_FUNCTION = "do_interrupt_x86_hardirq_x86_64"
EXEC_INTERRUPT_FUNCTION = "x86_cpu_exec_interrupt_x86_64"
# do_interrupt_x86_hardirq's first instructions (this build): mov %edx,%r9d; sub $ENV,%rdi;
# xor %r8d,%r8d; xor %ecx,%ecx -- 15 bytes, none position-dependent; ENV is env's offset in the CPU
HARDIRQ_PROLOGUE = (bytes.fromhex("4189d1" "4881ef"), 4, bytes.fromhex("4531c0" "31c9"))
# x86_cpu_exec_interrupt's CPU_INTERRUPT_HARD branch: andl $~(HARD|VIRQ),REQUEST(%rbp)
CLEAR_HARD = (bytes.fromhex("8165"), bytes.fromhex("fdfeffff"))
EXEC_INTERRUPT_SPAN = 0x200
CPU_INTERRUPT_HARD = 0x2
TABLE_SIZE = 64  # engines at once in one process (one per VM)


class _Entry(ctypes.Structure):
    _fields_ = [("env", ctypes.c_uint64), ("vector", ctypes.c_int32), ("keep_request", ctypes.c_int32)]


_table = (_Entry * TABLE_SIZE)()
_lock = threading.RLock()  # (the probe claims and frees an entry while attach() holds it)
_patch: dict[str, object] = {}   # "env_offset", "request_offset", "page": set once installed


def _jump(target: int) -> bytes:
    return bytes.fromhex("ff2500000000") + struct.pack("<Q", target)  # jmp *0(%rip)


def _stub(table: int, prologue: bytes, resume: int, before: bytes, request_from_env: int) -> bytes:
    """`before`: what ran at the entry before the stub (code ending in a jump); `prologue`: the
    function's own first instructions, resumed at `resume`; `request_from_env`: offset of
    CPUState.interrupt_request from env."""
    head = bytes.fromhex("85f6")            # test %esi,%esi
    head += bytes([0x75, 0])                # jnz before
    head += bytes.fromhex("83fa01")         # cmp $1,%edx
    head += bytes([0x75, 0])                # jne before
    head += bytes.fromhex("48b8") + struct.pack("<Q", table)   # movabs $table,%rax
    head += bytes.fromhex("b9") + struct.pack("<I", TABLE_SIZE)  # mov $N,%ecx
    loop = len(head)
    body = bytes.fromhex("483938")          # cmp %rdi,(%rax)
    body += bytes([0x74, 0])                # je found
    body += bytes.fromhex("4883c010")       # add $16,%rax
    body += bytes.fromhex("ffc9")           # dec %ecx
    body += bytes([0x75, 0])                # jnz loop
    body += bytes([0xEB, 0])                # jmp before
    found = bytes.fromhex("448b5008")       # mov 8(%rax),%r10d
    found += bytes.fromhex("4585d2")        # test %r10d,%r10d
    found += bytes([0x78, 0])               # js before
    found += bytes.fromhex("c74008ffffffff")  # movl $-1,8(%rax)
    found += bytes.fromhex("4489d6")        # mov %r10d,%esi
    found += bytes.fromhex("83780c00")      # cmpl $0,12(%rax)
    found += bytes([0x74, 7])               # je (over the or)
    found += bytes.fromhex("838f") + struct.pack("<i", request_from_env) + bytes([CPU_INTERRUPT_HARD])
    deliver = prologue + _jump(resume)      # orl $HARD,request(%rdi) above; then the function itself
    code = bytearray(head + body + found + deliver)
    found_at, before_at = len(head) + len(body), len(code)

    def branch(at: int, target: int) -> None:  # the rel8 of the two-byte jump at `at`
        code[at + 1] = (target - (at + 2)) & 0xFF

    branch(2, before_at)
    branch(7, before_at)
    branch(loop + 3, found_at)
    branch(loop + 11, loop)
    branch(loop + 13, before_at)
    branch(found_at + 7, before_at)
    return bytes(code) + before


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def _install_patch() -> bool:
    """Patch do_interrupt_x86_hardirq once per process; False if this build cannot be."""
    if _patch:
        return True
    if os.uname().machine not in ("x86_64", "AMD64"):
        return False
    from unicorn.unicorn_py3.unicorn import uclib
    from .helper_patch import _jump as helper_jump, _writable_text

    try:
        target = ctypes.cast(getattr(uclib, HARDIRQ_FUNCTION), ctypes.c_void_p).value
        exec_interrupt = ctypes.cast(getattr(uclib, EXEC_INTERRUPT_FUNCTION), ctypes.c_void_p).value
    except AttributeError:
        log.info("software CPU: libunicorn exports no %s: interrupts are delivered in Python", HARDIRQ_FUNCTION)
        return False
    assert target is not None and exec_interrupt is not None
    first, env_size, last = HARDIRQ_PROLOGUE
    length = len(first) + env_size + len(last)
    entry = ctypes.string_at(target, length)
    jump_length = len(helper_jump(0))
    if entry[:jump_length - 8] == helper_jump(0)[:jump_length - 8] and entry[jump_length:] == b"\xcc" * (length - jump_length):
        # the interrupt-window patch (helper_patch.py, which checked the prologue byte for byte) went first
        before, prologue = entry[:jump_length], helper_patch.PROLOGUES[HARDIRQ_FUNCTION]
    else:
        prologue = entry
        before = prologue + _jump(target + length)
    if prologue[:len(first)] != first or prologue[len(first) + env_size:] != last:
        log.info("software CPU: %s is not the code pyvmm knows: interrupts are delivered in Python", HARDIRQ_FUNCTION)
        return False
    env_offset = struct.unpack_from("<I", prologue, len(first))[0]
    code = ctypes.string_at(exec_interrupt, EXEC_INTERRUPT_SPAN)
    opcode, immediate = CLEAR_HARD
    found = [i for i in range(len(code) - 7) if code[i:i + 2] == opcode and code[i + 3:i + 7] == immediate]
    if len(found) != 1:
        log.info("software CPU: %s is not the code pyvmm knows: interrupts are delivered in Python",
                 EXEC_INTERRUPT_FUNCTION)
        return False
    request_offset = code[found[0] + 2]
    stub = _stub(ctypes.addressof(_table), prologue, target + length, before, request_offset - env_offset)
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    page.write(stub)
    stub_address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    if _libc().mprotect(stub_address, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_EXEC) != 0:
        log.info("software CPU: no executable page for the interrupt stub: interrupts are delivered in Python")
        return False
    for slot in _table:
        slot.env, slot.vector, slot.keep_request = 0, -1, 0
    patch = _jump(stub_address).ljust(length, b"\xcc")
    try:
        _writable_text(target, len(patch), lambda: ctypes.memmove(target, patch, len(patch)))
    except OSError as exc:
        log.info("software CPU: cannot patch %s (%s): interrupts are delivered in Python", HARDIRQ_FUNCTION, exc)
        return False
    _patch.update(env_offset=env_offset, request_offset=request_offset, page=page)
    return True


class NativeInterrupts:
    """One engine's entry in the stub's table: arm a vector for its next emu_start."""

    def __init__(self, cpu_address: int, entry: _Entry) -> None:
        self._entry = entry
        self._closed = False
        self._request = ctypes.c_uint32.from_address(cpu_address + int(_patch["request_offset"]))  # type: ignore[call-overload]

    @classmethod
    def attach(cls, cpu_address: int, engine_offsets) -> "NativeInterrupts | None":
        """For the engine whose CPUState is at `cpu_address`; None where the patch cannot be
        made or did not verify (the caller delivers interrupts in Python)."""
        with _lock:
            interrupt_window.install(engine_offsets)  # its patch of the same entry goes first
            if not _install_patch() or not _verified():
                return None
            return cls._claim(cpu_address)

    @classmethod
    def _claim(cls, cpu_address: int) -> "NativeInterrupts | None":
        env = cpu_address + int(_patch["env_offset"])  # type: ignore[call-overload]
        for entry in _table:
            if entry.env == 0:
                entry.env, entry.vector, entry.keep_request = env, -1, 0
                return cls(cpu_address, entry)
        log.info("software CPU: more than %d engines: interrupts are delivered in Python", TABLE_SIZE)
        return None

    def arm(self, vector: int, keep_request: bool = False) -> None:
        """Deliver `vector` when the engine next runs (before its first instruction, IF allowing);
        `keep_request`: CPU_INTERRUPT_HARD stays set after it (an interrupt-window request)."""
        self._entry.vector, self._entry.keep_request = vector, int(keep_request)
        self._request.value |= CPU_INTERRUPT_HARD

    def requested(self) -> bool:
        """CPU_INTERRUPT_HARD is set: the engine's loop has yet to consume the request."""
        return bool(self._request.value & CPU_INTERRUPT_HARD)

    def armed(self) -> bool:
        """A vector is armed that the engine has not taken yet."""
        return self._entry.vector >= 0

    def disarm(self) -> int | None:
        """The armed vector the engine did not take (None if it did), now disarmed."""
        vector = self._entry.vector
        self._entry.vector = -1
        self._request.value &= ~CPU_INTERRUPT_HARD
        return None if vector < 0 else vector

    def close(self) -> None:
        """Free the entry (once: it may belong to another engine afterwards)."""
        with _lock:
            if not self._closed:
                self._closed = True
                self._entry.vector, self._entry.env = -1, 0


_verdict: list[bool] = []


def _verified() -> bool:
    """Once per process: a probe guest takes an armed vector through the patched path, with the
    frame and handler the SDM gives, and leaves it armed while IF is clear."""
    if not _verdict:
        try:
            _verdict.append(_probe())
        except Exception as exc:  # a probe that cannot run proves nothing: deliver in Python
            log.info("software CPU: the native interrupt probe failed (%s): interrupts are delivered in Python", exc)
            _verdict.append(False)
        if not _verdict[0]:
            log.info("software CPU: native interrupt delivery did not verify: interrupts are delivered in Python")
    return _verdict[0]


_PROBE_IDT, _PROBE_CODE, _PROBE_HANDLER, _PROBE_VECTOR = 0x5000, 0x17000, 0x18000, 0x31


def _probe() -> bool:
    import unicorn as U
    import unicorn.x86_const as X
    from .engine_state import _engine_address, engine_offsets
    from .native_delivery import NativeExceptionDelivery
    from .private_state import _probe_uc

    uc = _probe_uc()  # 64-bit mode at CPL0, flat GDT (code 0x08, data 0x10), paging on
    cpu = ctypes.c_uint64.from_address(_engine_address(uc) + engine_offsets().cpu).value
    gates = b""
    for vector in range(256):
        target = _PROBE_HANDLER + 8 * vector  # each vector's handler: mov $vector,%eax; hlt
        low = (target & 0xFFFF) | 0x08 << 16 | 0x8E << 40 | (target >> 16 & 0xFFFF) << 48
        gates += struct.pack("<QQ", low, target >> 32)
        uc.mem_write(target, bytes([0xB8]) + struct.pack("<I", vector) + b"\xf4\x90\x90")
    uc.mem_write(_PROBE_IDT, gates)
    uc.reg_write(X.UC_X86_REG_IDTR, (0, _PROBE_IDT, len(gates) - 1, 0))
    uc.mem_write(_PROBE_CODE, b"\x90\x90\xfb\x90\xf4")  # nop; nop; sti; nop; hlt
    uc.ctl_exits_enabled(True)
    uc.ctl_set_exits([])
    if NativeExceptionDelivery.install(uc, cpu) is None:
        return False
    interrupts = NativeInterrupts._claim(cpu)
    if interrupts is None:
        return False
    try:
        # IF clear: the vector stays armed; the guest runs until its STI allowed it (after the nop
        # in STI's shadow), and is interrupted there
        uc.reg_write(X.UC_X86_REG_RFLAGS, 0x2)
        uc.reg_write(X.UC_X86_REG_RSP, 0x1FF00)
        uc.reg_write(X.UC_X86_REG_RAX, 0)
        interrupts.arm(_PROBE_VECTOR)
        uc.emu_start(_PROBE_CODE, 0xFFFF_FFFF_FFFF_FFFF)
        rsp = uc.reg_read(X.UC_X86_REG_RSP)
        frame = struct.unpack("<5Q", uc.mem_read(rsp, 40))
        taken = uc.reg_read(X.UC_X86_REG_RAX) == _PROBE_VECTOR and interrupts.disarm() is None
        expected = (_PROBE_CODE + 4, 0x08, 0x202, 0x1FF00, 0x10)
        if not taken or frame != expected or uc.reg_read(X.UC_X86_REG_RFLAGS) & 0x200:
            log.debug("native interrupt probe: taken %s, frame %s (expected %s)", taken, frame, expected)
            return False
        return True
    finally:
        interrupts.close()
