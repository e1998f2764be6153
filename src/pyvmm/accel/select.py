"""Choosing the CPU backend: `--accel kvm|tcg|auto`.

`auto` uses KVM when it runs guest kernel code natively, and the software CPU
when /dev/kvm is missing or unusable, or when KVM only emulates kernel-mode code
(a nested, software-assisted KVM such as kvm_pvm: see `pyvmm kvm-info`). The
calibration behind that decision is cached per host boot, so it costs one
tiny-guest run per reboot of the host, not one per VM.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..user_cache import user_cache

log = logging.getLogger(__name__)

CHOICES = ("auto", "kvm", "tcg")


@dataclass(frozen=True)
class AccelChoice:
    name: str    # "kvm" or "tcg"
    reason: str  # one line for the user
    kernel_code_emulated: bool = False  # KVM here emulates guest kernel code (the calibration)

    def create(self):
        if self.name == "kvm":
            from .kvm import KvmAccelerator

            return KvmAccelerator(kernel_code_emulated=self.kernel_code_emulated)
        try:
            from .tcg.accelerator import TcgAccelerator
        except ImportError as exc:  # unicorn missing: an unusable host, not a pyvmm bug
            from .tcg.private_state import TcgUnsupported

            raise TcgUnsupported(f"the software CPU needs the Python package unicorn ({exc})") from None
        return TcgAccelerator()


def _cache_file() -> Path:
    return user_cache("host-calibration.json")


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _cached_calibration():
    from .kvm.calibration import Calibration, calibrate
    from ..kvm.system import default_device

    path, boot_id = _cache_file(), _boot_id()
    try:
        data = json.loads(path.read_text())
        if data.get("boot_id") == boot_id and data.get("device") == default_device():
            return Calibration(data["kernel_seconds"], data["user_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    result = calibrate()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"boot_id": boot_id, "device": default_device(),
                                   "kernel_seconds": result.kernel_seconds, "user_seconds": result.user_seconds}))
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("cannot cache the calibration: %s", exc)
    return result


def kvm_emulates_kernel_code() -> bool:
    """Whether this host's KVM emulates guest kernel code, from the cached calibration; False
    when KVM cannot even run the calibration guest (the VM will fail with its own error)."""
    try:
        return _cached_calibration().kernel_code_emulated
    except Exception as exc:
        log.debug("no KVM calibration: %s", exc)
        return False


def choose_accelerator(requested: str = "auto") -> AccelChoice:
    if requested not in CHOICES:
        from ..errors import ConfigError

        raise ConfigError(f"must be one of {', '.join(CHOICES)} (got {requested!r})", "accel")
    from ..kvm import Kvm, KvmUnavailable

    if requested == "kvm":
        Kvm().close()  # no usable KVM: KvmUnavailable (one line) now, before any guest is built
        return AccelChoice("kvm", "requested with --accel kvm", kvm_emulates_kernel_code())
    if requested == "tcg":
        return AccelChoice("tcg", "requested with --accel tcg")

    try:
        Kvm().close()
    except KvmUnavailable as exc:
        return AccelChoice("tcg", f"no usable KVM ({exc})")
    try:
        calibration = _cached_calibration()
    except Exception as exc:  # a KVM that cannot even run the calibration guest is no fast path
        return AccelChoice("tcg", f"KVM could not run the calibration guest ({exc})")
    if calibration.kernel_code_emulated:
        return AccelChoice("tcg", f"this host's KVM emulates guest kernel code "
                                  f"({calibration.slowdown:,.0f}x slower than user code; see pyvmm kvm-info)")
    return AccelChoice("kvm", "hardware-assisted KVM runs guest kernel code natively")
