"""Did a slice end on HLT? The engine says so in CPUState.halted.

Unicorn's emu_start returns after a HLT without saying why. pyvmm used to read the byte
before RIP through the guest's page tables after every slice that nobody stopped: about 30
Python calls per halt, and an idle guest halts at every timer tick. QEMU's HLT sets
CPUState.halted, which stays set when emu_start returns, and every emu_start clears it first
(resume_all_vcpus): so a halted flag of 1 after a slice means that slice ended on a HLT.

The offset is found on a scratch engine, not assumed: the one 32-bit field of the CPUState
that reads 1 after a run ending on HLT, 0 after a run that ended on its instruction count,
and 1 after HLT again (about 30 ms: remembered per libunicorn build). None (the caller reads the
code byte as before) if that is not one field.
"""

from __future__ import annotations

import ctypes
import struct
import threading

_CODE = 0x1000
_lock = threading.Lock()
_offset: int | None = None
_found = False


def halted_offset(engine_offsets) -> int | None:
    """CPUState.halted's offset in this libunicorn (found once per build: probe_cache.py), or None."""
    global _offset, _found
    with _lock:
        if not _found:
            from .probe_cache import remembered

            _offset = remembered("cpu_halted", lambda: _discover(engine_offsets), to_json=lambda offset: offset,
                                 from_json=int)
            _found = True
        return _offset


def _discover(engine_offsets) -> int | None:
    import unicorn as U

    from .engine_state import EngineControl

    uc = U.Uc(U.UC_ARCH_X86, U.UC_MODE_64)
    uc.mem_map(_CODE, 0x1000)
    uc.mem_write(_CODE, bytes.fromhex("90f4" "9090"))  # nop; hlt | nop; nop
    cpu = EngineControl(uc, engine_offsets).cpu_address
    span = engine_offsets.icount_high  # the CPUState's own fields come before the icount word
    snapshots = []
    # (an exit address ends a run the way HLT does, flag included: the middle run ends on an
    # instruction count instead; pyvmm's slices have no exit address)
    for start, count in ((_CODE, 0), (_CODE + 2, 1), (_CODE, 0)):
        try:
            uc.emu_start(start, 0, count=count)
        except U.UcError:
            return None
        snapshots.append(ctypes.string_at(cpu, span))
    found = [offset for offset in range(0, span - 3, 4)
             if [struct.unpack_from("<I", s, offset)[0] for s in snapshots] == [1, 0, 1]]
    return found[0] if len(found) == 1 else None


def halt_flag(cpu_address: int, engine_offsets) -> ctypes.c_uint32 | None:
    """The halted field of the CPUState at `cpu_address`, or None where it was not found."""
    offset = halted_offset(engine_offsets)
    return None if offset is None else ctypes.c_uint32.from_address(cpu_address + offset)
