"""Coverage-guided fuzz harnesses for the code a guest, a user's file or an API client feeds.

Each harness is a function taking one input (bytes) that must return normally whatever the
input: a malformed input is answered with the error pyvmm documents for it (a failed request,
a device needing a reset, a LoaderError, a StateError, a 400), never another exception. The
harnesses import nothing of atheris: fuzz/run.py drives them under atheris (coverage-guided),
and tests/unit/test_fuzz_regressions.py replays every committed input (fuzz/corpus/NAME seeds
and fuzz/regressions/NAME crashes found and fixed) through them on every test run.
"""

from __future__ import annotations

import importlib
from typing import Callable

# name -> "module:function" (modules under fuzz/harnesses)
HARNESSES: dict[str, str] = {
    "virtqueue": "virtqueue:one_input",
    "virtio-blk": "devices:blk_input",
    "virtio-net": "devices:net_input",
    "net-rx-thread": "net_rx_thread:one_input",
    "net-tx-thread": "net_tx_thread:one_input",
    "virtio-vsock": "devices:vsock_input",
    "virtio-console": "devices:console_input",
    "virtio-rng": "devices:rng_input",
    "virtio-balloon": "devices:balloon_input",
    "virtio-mmio": "transports:mmio_input",
    "virtio-pci": "transports:pci_input",
    "elf": "loaders:elf_input",
    "multiboot": "loaders:multiboot_input",
    "bzimage": "loaders:bzimage_input",
    "pvh": "loaders:pvh_input",
    "state-file": "state_file:one_input",
    "api": "api:one_input",
}


def load(name: str) -> Callable[[bytes], None]:
    module, function = HARNESSES[name].split(":")
    return getattr(importlib.import_module(f"harnesses.{module}"), function)
