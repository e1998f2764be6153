"""A device's writes to guest RAM reach it in one store: a vCPU reading the same word at the same
time never sees a value nobody wrote.

struct's pack_into zeroes its destination before it packs. The virtio used index went through
it: Linux, on the other CPU, read 0, took the next used entry before the device had written it,
and found the previous lap's id there ("virtio_net virtio2: output.0:id 7 is not a head!", the
tools_io hang). The reader here is the software CPU, as in that hang: a guest loop that counts
the times it reads 0 from words a device thread keeps rewriting with values that are never 0.
"""

from __future__ import annotations

import os
import struct
import threading
import time

import pytest
import unicorn as U

from pyvmm.memory.guest_memory import GuestMemory, MemoryRegion

SIZE = 0x10000
CODE, WORDS, COUNTS = 0x1000, 0x2000, 0x3000
U16, U32, U64, UNALIGNED = WORDS, WORDS + 0x100, WORDS + 0x200, WORDS + 0x301
ZEROS, CHANGES = COUNTS, COUNTS + 8
SECONDS = 3.0   # the old writes showed a 0 within a fraction of a second on two CPUs


def _guest() -> bytes:
    """Forever: read the u16, u32, u64 and unaligned u32; count reads of 0, and changes of the u16."""
    code = bytearray(bytes.fromhex("31db"))                          # xor %ebx,%ebx (the last u16 seen)
    loop = len(code)
    zero_jumps = []
    for load in (bytes.fromhex("0fb70425") + struct.pack("<I", U16),   # movzwl U16,%eax
                 bytes.fromhex("8b0425") + struct.pack("<I", U32),     # mov U32,%eax
                 bytes.fromhex("488b0425") + struct.pack("<I", U64),   # mov U64,%rax
                 bytes.fromhex("8b0425") + struct.pack("<I", UNALIGNED)):
        code += load + bytes.fromhex("4885c0") + b"\x74\x00"         # test %rax,%rax; jz zero
        zero_jumps.append(len(code) - 1)
    code += bytes.fromhex("0fb70425") + struct.pack("<I", U16)        # movzwl U16,%eax
    code += bytes.fromhex("39d8") + b"\x74\x00"                       # cmp %ebx,%eax; je loop
    same = len(code) - 1
    code += bytes.fromhex("89c3" "48ff0425") + struct.pack("<I", CHANGES)  # mov %eax,%ebx; incq CHANGES
    code += b"\xeb\x00"                                               # jmp loop
    back = [same, len(code) - 1]
    zero = len(code)
    code += bytes.fromhex("48ff0425") + struct.pack("<I", ZEROS) + b"\xeb\x00"  # incq ZEROS; jmp loop
    back.append(len(code) - 1)
    for at in zero_jumps:
        code[at] = (zero - (at + 1)) & 0xFF
    for at in back:
        code[at] = (loop - (at + 1)) & 0xFF
    return bytes(code)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                    reason="the race needs the device and the vCPU on two host CPUs at once")
def test_a_racing_vcpu_never_reads_a_value_no_device_wrote():
    memory = GuestMemory([MemoryRegion(0, SIZE)])
    region = memory.regions[0]
    memory.write(CODE, _guest())
    for address, write in ((U16, memory.write_u16), (U32, memory.write_u32), (U64, memory.write_u64),
                           (UNALIGNED, memory.write_u32)):
        write(address, 1)
    uc = U.Uc(U.UC_ARCH_X86, U.UC_MODE_64)
    uc.mem_map_ptr(0, SIZE, U.UC_PROT_ALL, region.host_address)
    stop = threading.Event()

    def device():
        n = 0
        while not stop.is_set():
            n = n % 0xFFFF + 1   # 1..0xFFFF: never 0, and the high bytes change too
            memory.write_u16(U16, n)
            memory.write_u32(U32, n << 16 | n)
            memory.write_u64(U64, (n << 48) | n)
            memory.write_u32(UNALIGNED, n << 16 | n)

    writer = threading.Thread(target=device, daemon=True)
    timer = threading.Timer(SECONDS, uc.emu_stop)
    writer.start()
    timer.start()
    try:
        uc.emu_start(CODE, 0xFFFF_FFFF_FFFF)   # (the GIL is released while the guest runs)
    finally:
        stop.set()
        timer.cancel()
        writer.join()
        del uc
    zeros, changes = memory.read_u64(ZEROS), memory.read_u64(CHANGES)
    memory.close()
    assert changes > 10, "the guest never saw the device's writes: nothing was tested"
    assert zeros == 0, f"the guest read 0 {zeros} times in {changes} changes"
