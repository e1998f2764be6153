"""Stop Unicorn from another thread, between two instructions, without losing hooks.

pyvmm runs each vCPU in time slices: one `emu_start` with no instruction limit (a
limit costs a callback before every instruction, about 3x slower translated code),
ended by the slice timer's thread. Unicorn's own way to do that, `uc_emu_stop()`,
breaks the guest in three ways when it arrives asynchronously, all seen booting
Linux and reproduced by the probes below:

1. Mid-instruction stops. Unicorn follows every guest load and store with a check
   for a pending stop, and honours it right there: the PC goes back to the start
   of the instruction, while what the instruction already stored stays stored, so
   the guest executes it again (`lock xadd`, `inc (mem)`: a count taken twice;
   `lock cmpxchg`: a lock that was taken but looks busy, so its owner spins on it
   forever). The engine's `no_exit_request` flag, set before anything is
   translated, leaves those checks out: a stop is then honoured where the next
   translation block starts, between two instructions.
2. Skipped hooks. `uc_emu_stop()` sets `stop_request`, and until the block ends
   Unicorn's CPUID and SYSCALL helpers walk the instruction hooks only up to the
   first one that is not theirs: pyvmm's CPUID and SYSCALL hooks are skipped, so
   SYSCALL becomes a two-byte no-op (RAX keeps the syscall number: brk "returns"
   12, rt_sigreturn returns into the signal frame) and CPUID answers Unicorn's
   own values. So the slice timer does not call `uc_emu_stop()`: it makes the
   same exit request the CPU loop acts on (CPUState.exit_request and the high
   half of icount_decr, as QEMU's cpu_exit() does) and sets `invalid_error` to
   STOP_ERROR, one of the conditions that ends emu_start; emu_start then fails
   with STOP_ERROR, which means "stopped".
3. A stale PC. A RIP write from a hook (exception delivery, SYSCALL) sets
   `skip_sync_pc_on_exit`, which nothing clears when the exit that write asks for
   takes another path (it does for pyvmm's hooks); every later stop in the same
   emu_start then resumes at the written PC instead of the block's, re-running
   the blocks in between. pyvmm clears it after its own RIP writes.

The offsets of these fields are found at run time on scratch Unicorn instances,
each as the unique candidate that behaves as described, then verified by using
them; anything unexpected raises TcgUnsupported.
"""

from __future__ import annotations

import bisect
import ctypes
import dataclasses
import logging
import struct

from .private_state import TcgUnsupported

log = logging.getLogger(__name__)

STOP_ERROR = 19  # UC_ERR_HOOK_EXIST: what emu_start fails with when the slice timer stopped it
_NEVER = 0xFFFF_FFFF_FFFF_FFFF
_PROBE_CODE, _PROBE_MMIO = 0x1000, 0x10000


@dataclasses.dataclass(frozen=True)
class EngineOffsets:
    # in the uc engine struct; None when this build needs no help
    no_exit_request: int | None  # bool: no stop checks after guest memory accesses
    skip_sync_pc: int | None     # bool skip_sync_pc_on_exit: left set by a RIP write from a hook
    invalid_error: int           # int: a non-zero value ends emu_start with that error
    cpu: int                     # CPUState *
    # in the CPUState
    exit_request: int            # bool
    icount_high: int             # u16: icount_decr.u16.high, -1 makes the next block start exit


class EngineControl:
    """The engine fields of one Unicorn instance (see the module docstring)."""

    def __init__(self, uc, offsets: EngineOffsets) -> None:
        self.offsets = offsets
        engine = _engine_address(uc)
        self._engine = engine
        cpu = self.cpu_address = ctypes.c_uint64.from_address(engine + offsets.cpu).value  # CPUState *
        self._invalid_error = ctypes.c_int32.from_address(engine + offsets.invalid_error)
        self._exit_request = ctypes.c_uint8.from_address(cpu + offsets.exit_request)
        self._icount_high = ctypes.c_uint16.from_address(cpu + offsets.icount_high)

    def stop_between_instructions(self) -> None:
        """Leave the stop checks after guest memory accesses out of translated code. Call
        before the first emu_start: it applies to code translated after it."""
        if self.offsets.no_exit_request is not None:
            _set_byte(self._engine, self.offsets.no_exit_request, 1)

    def forget_pc_write(self) -> None:
        """After a hook wrote RIP: let later stops in this emu_start restore the PC from their
        block again. Only for hooks after which the CPU leaves translated code by itself
        (exception and SYSCALL hooks): a stop honoured at a block start before that would
        replace the written RIP with the block's address."""
        if self.offsets.skip_sync_pc is not None:
            _set_byte(self._engine, self.offsets.skip_sync_pc, 0)

    def request_stop(self) -> None:
        """End the running emu_start at the next block start, with STOP_ERROR (any thread).
        Harmless on an idle engine: emu_start resets all three before it runs."""
        self._invalid_error.value = STOP_ERROR  # first: the CPU loop checks it after it exits
        self._exit_request.value = 1
        self._icount_high.value = 0xFFFF


# --- discovery ------------------------------------------------------------------------------


def _engine_address(uc) -> int:
    address = ctypes.cast(uc._uch, ctypes.c_void_p).value
    assert address is not None  # a live engine's handle is never NULL
    return address


def _allocation_size(address: int) -> int:
    """Bytes that can be read at a malloc'ed block (the engine struct)."""
    try:
        usable = ctypes.CDLL(None).malloc_usable_size
    except AttributeError:
        raise TcgUnsupported("cannot size Unicorn's engine struct (no malloc_usable_size in the C library)") from None
    usable.restype, usable.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
    return usable(address)


def _changed(old: bytes, new: bytes, chunk: int = 256) -> list[int]:
    """Offsets of the bytes that differ (equal chunks are skipped in C)."""
    return [i for start in range(0, len(old), chunk) if old[start:start + chunk] != new[start:start + chunk]
            for i in range(start, min(start + chunk, len(old))) if old[i] != new[i]]


def _set_byte(base: int, offset: int, value: int) -> None:
    ctypes.c_uint8.from_address(base + offset).value = value


class _ReadableMemory:
    """This process's readable mappings (from /proc/self/maps), to read through a pointer
    only where that cannot fault."""

    def __init__(self) -> None:
        ranges = []
        with open("/proc/self/maps") as maps:
            for line in maps:
                span, perms = line.split()[:2]
                if perms.startswith("r"):
                    low, high = (int(x, 16) for x in span.split("-"))
                    ranges.append((low, high))
        ranges.sort()
        self._lows = [low for low, _ in ranges]
        self._ranges = ranges

    def readable(self, address: int, limit: int) -> int:
        """How many bytes from `address` (up to `limit`) are readable."""
        i = bisect.bisect_right(self._lows, address) - 1
        if i < 0:
            return 0
        low, high = self._ranges[i]
        end = high
        while i + 1 < len(self._ranges) and self._ranges[i + 1][0] == end and end - address < limit:
            i += 1
            end = self._ranges[i][1]
        return max(0, min(end - address, limit)) if low <= address < high else 0


def _probe_uc(no_exit_request: int | None = None):
    import unicorn as U

    uc = U.Uc(U.UC_ARCH_X86, U.UC_MODE_64)
    uc.ctl_exits_enabled(True)  # as TcgVcpu runs it
    uc.ctl_set_exits([])
    if no_exit_request is not None:
        _set_byte(_engine_address(uc), no_exit_request, 1)
    uc.mem_map(_PROBE_CODE, 0x1000)
    return uc


# 1. no_exit_request -------------------------------------------------------------------------

_ENGINE_SPAN = 8192  # bytes of the engine struct searched for no_exit_request
# mov %eax,(0x10000) -> the MMIO write callback calls uc.emu_stop()
# inc %rcx ; inc %rcx ; jmp next -> the rest of the block
# next: hlt
_MID_BLOCK_PROBE = bytes.fromhex("89042500000100" "48ffc1" "48ffc1" "eb00" "f4")


def _mid_block_stop(no_exit_request: int | None) -> tuple[int, int]:
    """Stop a scratch CPU from an MMIO write in the middle of a block: (rip, rcx) afterwards.
    Stopped between instructions: (next, 2); in the middle of the mov: (mov, 0)."""
    import unicorn.x86_const as X

    uc = _probe_uc(no_exit_request)
    uc.mem_write(_PROBE_CODE, _MID_BLOCK_PROBE)
    uc.mmio_map(_PROBE_MMIO, 0x1000, None, None, lambda uc, *_: uc.emu_stop(), None)
    uc.emu_start(_PROBE_CODE, _NEVER)
    return uc.reg_read(X.UC_X86_REG_RIP), uc.reg_read(X.UC_X86_REG_RCX)


def _discover_no_exit_request() -> int | None:
    """Found as the byte before init_done: the engine sets init_done (0 -> 1) on the first API
    call, and the two share a group of four bools (hook_insert, first_tb, no_exit_request,
    init_done) that starts 8-aligned after a uint64 and holds 0, x, 0, 1 then."""
    import unicorn as U
    import unicorn.x86_const as X

    between = (_PROBE_CODE + len(_MID_BLOCK_PROBE) - 1, 2)
    baseline = _mid_block_stop(None)
    if baseline == between:
        return None  # this build stops between instructions anyway
    if baseline != (_PROBE_CODE, 0):
        raise TcgUnsupported(f"a stop in the middle of a block ended at an unexpected place {baseline}: "
                             "this unicorn build is not supported by pyvmm's software CPU")
    uc = U.Uc(U.UC_ARCH_X86, U.UC_MODE_64)
    engine = _engine_address(uc)
    before = ctypes.string_at(engine, _ENGINE_SPAN)
    uc.reg_read(X.UC_X86_REG_RIP)  # the first API call initialises the engine
    after = ctypes.string_at(engine, _ENGINE_SPAN)
    found = [init_done - 1 for init_done in range(3, _ENGINE_SPAN)
             if before[init_done] == 0 and after[init_done] == 1
             and before[init_done - 1] == after[init_done - 1] == 0
             and (init_done - 3) % 8 == 0 and after[init_done - 3] == 0]
    if len(found) != 1:
        raise TcgUnsupported(f"cannot locate Unicorn's no_exit_request flag ({len(found)} candidates): "
                             "this unicorn build is not supported by pyvmm's software CPU")
    seen = _mid_block_stop(found[0])
    if seen != between:
        raise TcgUnsupported(f"Unicorn's no_exit_request flag did not verify (a stop in the middle of a "
                             f"block ended at {seen}, expected {between})")
    return found[0]


# 2. skip_sync_pc_on_exit ------------------------------------------------------------------------

# int3 -> the interrupt hook writes RIP (where it already is), as exception delivery does
# jmp a
# a: mov %eax,(0x10000) -> the MMIO write callback calls uc.emu_stop() (second run only)
#    inc %rcx ; jmp b
# b: hlt
_STALE_PC_PROBE = bytes.fromhex("cc" "eb00" "89042500000100" "48ffc1" "eb00" "f4")


def _stop_after_pc_write(no_exit_request: int | None, skip_sync_pc: int | None,
                         flipped: list[int] | None = None) -> int:
    """RIP after a stop that follows a RIP write from a hook, in blocks that are chained (the
    second run): block b's address if the stop restored the PC, 0x1001 (where the hook left it)
    if it did not. `flipped` receives the engine bytes the RIP write set from 0 to 1."""
    import unicorn as U
    import unicorn.x86_const as X

    uc = _probe_uc(no_exit_request)
    engine = _engine_address(uc)
    size = _allocation_size(engine)
    uc.mem_write(_PROBE_CODE, _STALE_PC_PROBE)
    armed: list[bool] = []

    def on_write(uc, *_):
        if armed:
            uc.emu_stop()

    def on_interrupt(uc, vector, _):
        rip = uc.reg_read(X.UC_X86_REG_RIP)
        before = ctypes.string_at(engine, size)
        uc.reg_write(X.UC_X86_REG_RIP, rip)
        if flipped is not None:
            after = ctypes.string_at(engine, size)
            flipped[:] = [o for o in _changed(before, after) if before[o] == 0 and after[o] == 1]
        if skip_sync_pc is not None:
            _set_byte(engine, skip_sync_pc, 0)

    uc.mmio_map(_PROBE_MMIO, 0x1000, None, None, on_write, None)
    uc.hook_add(U.UC_HOOK_INTR, on_interrupt)
    uc.emu_start(_PROBE_CODE, _NEVER)  # translates and chains the blocks, ends on the HLT
    armed.append(True)
    uc.emu_start(_PROBE_CODE, _NEVER)
    return uc.reg_read(X.UC_X86_REG_RIP)


def _discover_skip_sync_pc(no_exit_request: int | None) -> int | None:
    """Found among the bytes a RIP write from a hook sets, as the one whose clearing makes the
    next stop restore the PC from its block."""
    good, stale = _PROBE_CODE + len(_STALE_PC_PROBE) - 1, _PROBE_CODE + 1
    flipped: list[int] = []
    baseline = _stop_after_pc_write(no_exit_request, None, flipped)
    if baseline == good:
        return None
    if baseline != stale:
        raise TcgUnsupported(f"a stop after a RIP write ended at an unexpected place ({baseline:#x}): "
                             "this unicorn build is not supported by pyvmm's software CPU")
    found = [offset for offset in flipped if _stop_after_pc_write(no_exit_request, offset) == good]
    if len(found) != 1:
        raise TcgUnsupported(f"cannot locate Unicorn's skip_sync_pc_on_exit flag ({len(found)} candidates): "
                             "this unicorn build is not supported by pyvmm's software CPU")
    return found[0]


# 3. invalid_error, the CPUState and its exit request --------------------------------------------

_UNMAPPED = 0x71_2345_6000  # an address no probe maps


def _discover_invalid_error() -> int:
    """invalid_error is the int after invalid_addr, the u64 that keeps the address of the last
    invalid access (here: a read of an unmapped address)."""
    import unicorn as U

    uc = _probe_uc()
    uc.mem_write(_PROBE_CODE, b"\x48\xa1" + struct.pack("<Q", _UNMAPPED) + b"\xf4")  # movabs (_UNMAPPED),%rax
    try:
        uc.emu_start(_PROBE_CODE, _NEVER)
    except U.UcError:
        pass
    engine = _engine_address(uc)
    data = ctypes.string_at(engine, _allocation_size(engine))
    found = [offset + 8 for offset in range(0, len(data) - 11, 8)
             if struct.unpack_from("<Q", data, offset)[0] == _UNMAPPED and struct.unpack_from("<i", data, offset + 8)[0] == 0]
    if len(found) != 1:
        raise TcgUnsupported(f"cannot locate Unicorn's invalid_error ({len(found)} candidates): "
                             "this unicorn build is not supported by pyvmm's software CPU")
    return found[0]


_CPU_SPAN = 1 << 16  # bytes read through each candidate pointer


def _discover_cpu() -> tuple[int, int, int]:
    """(engine offset of the CPUState pointer, exit_request, icount_decr.u16.high): the one
    pointer of the initialised engine through which uc.emu_stop() (QEMU's cpu_exit) changes
    exactly one byte 0 -> 1 (exit_request) and then one u16 0 -> 0xffff (icount high).

    A span read through a pointer can run past its object into live heap, so the snapshots go
    into buffers allocated beforehand (a bytes object made between the two snapshots could land
    in another candidate's span and disqualify it), and an inconclusive probe is repeated."""
    for _ in range(_CPU_PROBE_ATTEMPTS):
        found = _probe_cpu_exit_request()
        # two engine fields may point into the same CPU object: the same bytes, either will do
        if found and len({address for address, _ in found}) == 1:
            return found[0][1]
    raise TcgUnsupported(f"cannot locate Unicorn's CPU exit request ({len(found)} candidates): "
                         "this unicorn build is not supported by pyvmm's software CPU")


_CPU_PROBE_ATTEMPTS = 3


def _probe_cpu_exit_request() -> list[tuple[tuple[int, int], tuple[int, int, int]]]:
    """[((exit_request address, icount high address), (engine offset, exit_request, icount high))]
    for each pointer that passes the test."""
    import unicorn.x86_const as X

    uc = _probe_uc()
    uc.reg_read(X.UC_X86_REG_RIP)
    engine = _engine_address(uc)
    data = ctypes.string_at(engine, _allocation_size(engine))
    memory = _ReadableMemory()
    candidates = []
    for offset in range(0, len(data) - 7, 8):
        pointer = struct.unpack_from("<Q", data, offset)[0]
        if pointer and pointer % 8 == 0 and pointer != engine:
            size = memory.readable(pointer, _CPU_SPAN)
            if size >= 64:
                candidates.append((offset, pointer, size, ctypes.create_string_buffer(size),
                                   ctypes.create_string_buffer(size)))

    def on_write(uc, *_):
        for _offset, pointer, size, before, _after in candidates:
            ctypes.memmove(before, pointer, size)
        uc.emu_stop()
        for _offset, pointer, size, _before, after in candidates:
            ctypes.memmove(after, pointer, size)

    uc.mem_write(_PROBE_CODE, bytes.fromhex("89042500000100" "f4"))  # mov %eax,(0x10000) ; hlt
    uc.mmio_map(_PROBE_MMIO, 0x1000, None, None, on_write, None)
    uc.emu_start(_PROBE_CODE, _NEVER)
    found = []
    for offset, pointer, _, before, after in candidates:
        old, new = before.raw, after.raw
        changed = _changed(old, new)
        if (len(changed) == 3 and old[changed[0]] == 0 and new[changed[0]] == 1
                and changed[1] % 2 == 0 and changed[2] == changed[1] + 1
                and struct.unpack_from("<H", old, changed[1])[0] == 0
                and struct.unpack_from("<H", new, changed[1])[0] == 0xFFFF):
            found.append(((pointer + changed[0], pointer + changed[1]), (offset, changed[0], changed[1])))
    return found


# verification: a requested stop ends emu_start between instructions, no hook skipped -------------

# mov %eax,(0x10000) -> the MMIO write callback requests the stop
# cpuid ; syscall -> both hooks must still run (Unicorn's SYSCALL ends the block)
# hlt
_STOP_PROBE = bytes.fromhex("89042500000100" "0fa2" "0f05" "f4")


def _verify(offsets: EngineOffsets) -> None:
    import unicorn as U
    import unicorn.x86_const as X

    uc = _probe_uc(offsets.no_exit_request)
    control = EngineControl(uc, offsets)
    uc.mem_write(_PROBE_CODE, _STOP_PROBE)
    called = []
    uc.mmio_map(_PROBE_MMIO, 0x1000, None, None, lambda uc, *_: control.request_stop(), None)
    # pyvmm's hook order: IN, OUT, CPUID, SYSCALL
    uc.hook_add(U.UC_HOOK_INSN, lambda uc, port, size, _: 0, None, 1, 0, X.UC_X86_INS_IN)
    uc.hook_add(U.UC_HOOK_INSN, lambda uc, port, size, value, _: None, None, 1, 0, X.UC_X86_INS_OUT)

    def on_cpuid(uc: U.Uc, _: object) -> int:
        called.append("cpuid")
        return 1

    def on_syscall(uc: U.Uc, _: object) -> None:
        called.append("syscall")

    uc.hook_add(U.UC_HOOK_INSN, on_cpuid, None, 1, 0, X.UC_X86_INS_CPUID)
    uc.hook_add(U.UC_HOOK_INSN, on_syscall, None, 1, 0, X.UC_X86_INS_SYSCALL)
    error = None
    try:
        uc.emu_start(_PROBE_CODE, _NEVER)
    except U.UcError as exc:
        error = exc.errno
    rip = uc.reg_read(X.UC_X86_REG_RIP)
    hlt = _PROBE_CODE + len(_STOP_PROBE) - 1
    if (error, called, rip) != (STOP_ERROR, ["cpuid", "syscall"], hlt):
        raise TcgUnsupported(f"Unicorn's engine offsets did not verify (a requested stop gave error {error}, "
                             f"hooks {called}, rip {rip:#x}; expected {STOP_ERROR}, cpuid and syscall, {hlt:#x})")
    # and the engine runs normally afterwards
    try:
        uc.emu_start(rip, _NEVER)
    except U.UcError as exc:
        raise TcgUnsupported(f"Unicorn did not run again after a requested stop: {exc}") from None
    if uc.reg_read(X.UC_X86_REG_RIP) != hlt + 1:
        raise TcgUnsupported("Unicorn did not run again after a requested stop")


def discover_engine_offsets() -> EngineOffsets:
    no_exit_request = _discover_no_exit_request()
    cpu, exit_request, icount_high = _discover_cpu()
    offsets = EngineOffsets(no_exit_request=no_exit_request, skip_sync_pc=_discover_skip_sync_pc(no_exit_request),
                            invalid_error=_discover_invalid_error(), cpu=cpu, exit_request=exit_request,
                            icount_high=icount_high)
    _verify(offsets)
    log.debug("unicorn engine offsets: %s", offsets)
    return offsets


_cached: EngineOffsets | None = None


def engine_offsets() -> EngineOffsets:
    global _cached
    if _cached is None:
        from .probe_cache import remembered

        _cached = remembered("engine_offsets", discover_engine_offsets, to_json=dataclasses.asdict,
                             from_json=lambda fields: EngineOffsets(**fields), verify=_verify)
    return _cached
