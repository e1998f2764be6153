"""The software CPU backend: Unicorn (QEMU's TCG as a library) plus what it leaves out."""

import os

# Unicorn 2.1 warns on stderr for registers it treats as no-ops in some modes; pyvmm
# accesses them knowingly (a 64-bit register file in every mode), so keep the console clean.
os.environ.setdefault("UC_IGNORE_REG_BREAK", "1")

import unicorn  # noqa: E402  (loads libunicorn: its engines' code buffers go right below it)

from . import code_buffer  # noqa: E402

code_buffer.reserve()
