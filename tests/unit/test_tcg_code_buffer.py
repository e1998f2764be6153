"""The software CPU's translated code lands within a direct call of libunicorn (code_buffer.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

U = pytest.importorskip("unicorn")

from pyvmm.accel.tcg import code_buffer  # noqa: E402

MAPS = """\
55d1c2a00000-55d1c2a21000 r--p 00000000 fe:00 131 /usr/bin/python3.11
7f3e11000000-7f3e51000000 rwxp 00000000 00:00 0
7f3e51200000-7f3e515a2000 r--p 00000000 fe:00 977 /venv/site-packages/unicorn/lib/libunicorn.so.2
7f3e515a2000-7f3e51612000 r-xp 003a2000 fe:00 977 /venv/site-packages/unicorn/lib/libunicorn.so.2
7f3e51612000-7f3e51614000 r-xp 00412000 fe:00 977 /venv/site-packages/unicorn/lib/libunicorn.so.2
7f3e51614000-7f3e51645000 r-xp 00414000 fe:00 977 /venv/site-packages/unicorn/lib/libunicorn.so.2
7f3e51645000-7f3e51700000 rw-p 00445000 fe:00 977 /venv/site-packages/unicorn/lib/libunicorn.so.2
7ffd2b3c1000-7ffd2b3e2000 rw-p 00000000 00:00 0 [stack]
"""


def test_the_library_code_is_its_executable_mappings():
    assert code_buffer.library_code(MAPS) == (0x7F3E515A2000, 0x7F3E51645000)
    assert code_buffer.library_code(MAPS.replace("libunicorn", "libother")) is None


def test_reach_is_a_rel32_call_both_ways():
    code = (0x7F3E515A2000, 0x7F3E51645000)
    gib = 1 << 30
    assert code_buffer.within_reach(0x7F3E11000000, gib, code)          # just below (the buffer above)
    assert code_buffer.within_reach(0x7F3E51700000, gib, code)          # just above
    assert not code_buffer.within_reach(code[1] - (2 << 30), gib, code)  # its start 2 GiB below the code's end
    assert not code_buffer.within_reach(code[0] + (1 << 30) + (1 << 20), gib, code)  # its end beyond 2 GiB above
    assert code_buffer.within_reach(code[1] - code_buffer.REACH, gib, code)


# Run in a fresh interpreter: the space near libunicorn is then the test's (a long test process
# fills it with other engines' buffers and its threads' arenas).
RWX = """
import unicorn as U
from pyvmm.accel.tcg import code_buffer

def rwx(text):
    return {tuple(int(p, 16) for p in l.split()[0].split("-")) for l in text.splitlines()
            if l.split()[1].startswith("rwx") and len(l.split()) == 5}
code = code_buffer.library_code(open("/proc/self/maps").read())
"""
PLACE = RWX + """
uc = U.Uc(U.UC_ARCH_X86, U.UC_MODE_64)
before = open("/proc/self/maps").read()
size = code_buffer.place(uc)
uc.mem_map(0x1000, 0x1000)  # the first call: the engine allocates its code buffer now
[(low, high)] = rwx(open("/proc/self/maps").read()) - rwx(before)
print(size, high - low, code_buffer.within_reach(low, high - low, code))
"""


def _placed(script: str) -> tuple[int, int, bool]:
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    size, mapped, reached = done.stdout.split()
    return int(size), int(mapped), reached == "True"


def test_a_placed_engine_allocates_its_buffer_within_reach():
    size, mapped, reached = _placed(PLACE)
    assert mapped <= size and reached


FILL_AND_PLACE = RWX + """
chunk = 256 << 20
code_buffer.place(U.Uc(U.UC_ARCH_X86, U.UC_MODE_64))  # (takes back the reservation)
held = []
while not held or code_buffer.within_reach(held[-1], chunk, code):
    assert len(held) < 64, "could not fill the space near libunicorn"
    held.append(code_buffer._map_placeholder(chunk))
for hole in [a for a in held if code_buffer.within_reach(a, chunk, code)][-1:]:
    code_buffer._munmap(hole, chunk)
uc = U.Uc(U.UC_ARCH_X86, U.UC_MODE_64)
before = open("/proc/self/maps").read()
size = code_buffer.place(uc)
uc.mem_map(0x1000, 0x1000)
[(low, high)] = rwx(open("/proc/self/maps").read()) - rwx(before)
print(size, high - low, code_buffer.within_reach(low, high - low, code))
"""


def test_with_only_small_holes_near_libunicorn_the_buffer_shrinks_to_fit():
    """The space within reach filled but for holes under 512 MiB: a default (1 GiB) buffer would
    land out of reach, so the engine is given a smaller one, which lands within it."""
    size, mapped, reached = _placed(FILL_AND_PLACE)
    assert size < code_buffer.DEFAULT_SIZE and mapped <= size and reached
