"""KVM's own exit details that need decoding before pyvmm can act on them.

The exits the rest of pyvmm matches on are backend-neutral (accel/exits.py); what is
KVM-specific stays here: an internal error's suberror and the instruction bytes KVM
fetched, which the KVM accelerator uses to complete or to name the failed instruction.
"""

from __future__ import annotations

from . import uapi


class InternalError:
    __slots__ = ("suberror", "data")

    def __init__(self, suberror: int, data: tuple[int, ...]) -> None:
        self.suberror, self.data = suberror, data

    def describe(self) -> str:
        kinds = {
            uapi.KVM_INTERNAL_ERROR_EMULATION: "instruction emulation failed",
            uapi.KVM_INTERNAL_ERROR_SIMUL_EX: "exception raised while delivering another",
            uapi.KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failed",
            uapi.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected exit reason",
        }
        return kinds.get(self.suberror, f"suberror {self.suberror}")

    @property
    def instruction_bytes(self) -> bytes:
        """The bytes KVM fetched for an emulation failure, when it reports them (data[0] bit 0,
        KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES: a size byte then 15 bytes in data[1:3])."""
        if self.suberror != uapi.KVM_INTERNAL_ERROR_EMULATION or len(self.data) < 3 or not self.data[0] & 1:
            return b""
        raw = self.data[1].to_bytes(8, "little") + self.data[2].to_bytes(8, "little")
        return raw[1:1 + min(raw[0], 15)]
