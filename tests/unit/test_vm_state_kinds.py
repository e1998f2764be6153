"""A process that only reads states (a snapshot loaded in a new process, a migration's
destination) imports vm_state, not the builder: every state kind a VM saves must be known
from vm_state alone, or decoding its device states fails ("a 'ged' state is not a state
state" did, for the Generic Event Device, which only the builder imported)."""

from __future__ import annotations

import subprocess
import sys

PROGRAM = """
import pyvmm.vm_state, pyvmm.persist as persist
known = set(persist._KINDS)
import pyvmm.builder, pyvmm.restore
print(" ".join(sorted(set(persist._KINDS) - known)))
"""


def test_vm_state_alone_knows_every_state_kind_a_vm_saves():
    done = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"state kinds only the builder registers: {done.stdout.strip()}"
