"""The warm snapshot: the default guest booted until its agent answers, saved once per user,
image version and accelerator, so that a sandbox or `pyvmm run -- CMD` starts from it in a
fraction of a boot.

    $XDG_CACHE_HOME/pyvmm/warm/KEY/     (default ~/.cache/pyvmm/warm/KEY/)
        vm.state    the VmState (pyvmm.snapshot's checksummed state file)
        vm.mem      guest RAM, sparse
        meta.json   what it was made from (the key's parts) and when
        boot.log    the serial console of the boot it was made from

KEY is a hash of what the snapshot depends on: pyvmm's version, the image's recipe and the
sha256 of its kernel and initramfs, the accelerator, the machine (memory, vCPUs, vsock CID).
A new image or another pyvmm version gives another key: the snapshot is made again on first
use and the stale ones are removed. Making one takes a lock (warm/.lock), so two first users
do not both boot the guest; the second waits and uses the first's. A snapshot that cannot be
loaded (a bad or truncated file, a memory file of the wrong size) is never used: a warning
says so and it is made again.

The guest was booted with vsock CID 3 and init running `WARM_COMMAND` (it only waits; the
agent serves). Every VM started from the snapshot gets its own vsock socket (the state is
rewritten before it is built) and its own identity (identity.refresh_identity, then the
agent's set_identity: CID, VM generation ID, random pool, wall clock, machine id).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterator

from .. import __version__
from ..images import ImageError, cached_image, default_image
from ..images.kernel_warnings import CONSOLE_LOGLEVEL, oops_lines
from ..user_cache import user_cache

log = logging.getLogger(__name__)

WARM_MEMORY = 256 << 20
WARM_CPUS = 1
WARM_CID = 3
# What init runs in the warm guest: nothing but waiting (the agent runs the commands).
WARM_COMMAND = ["sh", "-c", "exec sleep 2147483647"]
BOOT_TIMEOUT = 600.0
AGENT_ROUND = 5.0  # seconds per attempt to reach the agent while the guest boots
STATE_FILE, MEMORY_FILE, META_FILE, BOOT_LOG = "vm.state", "vm.mem", "meta.json", "boot.log"


class WarmSnapshotError(ImageError):
    """The warm snapshot could not be made (one line)."""


@dataclass(frozen=True)
class WarmSnapshot:
    directory: pathlib.Path
    key: str
    accel: str

    @property
    def state_path(self) -> pathlib.Path:
        return self.directory / STATE_FILE

    @property
    def memory_path(self) -> pathlib.Path:
        return self.directory / MEMORY_FILE


def warm_root() -> pathlib.Path:
    return user_cache("warm")


def key_parts(image, accel: str) -> dict:
    """What a warm snapshot depends on (meta.json keeps them)."""
    artifacts = image.manifest.get("artifacts", {})
    return {"pyvmm": __version__, "recipe": image.manifest.get("recipe"), "accel": accel,
            "kernel_sha256": artifacts.get("vmlinuz", {}).get("sha256"),
            "initramfs_sha256": artifacts.get("initramfs.cpio.gz", {}).get("sha256"),
            "memory": WARM_MEMORY, "cpus": WARM_CPUS, "cid": WARM_CID, "command": WARM_COMMAND,
            "cmdline": CONSOLE_LOGLEVEL}


def key_of(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


@contextmanager
def _locked(root: pathlib.Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _problem(directory: pathlib.Path, parts: dict) -> str:
    """'' when `directory` holds a complete snapshot made from `parts`; else why not."""
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError) as exc:
        return f"{META_FILE} unreadable ({exc})"
    if not isinstance(meta, dict) or meta.get("parts") != parts:
        return "made from something else"
    for name in (STATE_FILE, MEMORY_FILE):
        try:
            size = (directory / name).stat().st_size
        except OSError:
            return f"{name} missing"
        if size != meta.get("sizes", {}).get(name):
            return f"{name} has the wrong size"
    return ""


def warm_snapshot(accel_choice, *, progress: Callable[[str], None] | None = None,
                  rebuild_reason: str | None = None) -> WarmSnapshot:
    """The warm snapshot for `accel_choice` (accel.select.AccelChoice), made first if it is
    missing, stale or (`rebuild_reason`: the caller found it unusable) broken."""
    try:     # the manifest names the image's version; its files are not read here (hashing them costs)
        image = cached_image(verify_hashes=False)
    except ImageError:
        image = default_image()
    parts = key_parts(image, accel_choice.name)
    key = key_of(parts)
    root = warm_root()
    directory = root / key
    with _locked(root):
        problem = rebuild_reason or _problem(directory, parts)
        if not problem:
            return WarmSnapshot(directory, key, accel_choice.name)
        if problem != "missing":
            log.warning("warm snapshot %s: %s: making it again", directory, problem)
        work = pathlib.Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            _make(work, image, accel_choice, parts, progress)
            _replace(directory, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        _prune(root, keep=key)
    return WarmSnapshot(directory, key, accel_choice.name)


def _replace(directory: pathlib.Path, work: pathlib.Path) -> None:
    """Put `work` in `directory`'s place. A VM mapping the old memory file keeps its pages
    (the file lives on while mapped)."""
    if directory.exists():
        old = directory.with_name(f".old-{directory.name}-{os.getpid()}")
        os.rename(directory, old)
        shutil.rmtree(old, ignore_errors=True)
    os.rename(work, directory)


def _prune(root: pathlib.Path, keep: str) -> None:
    """Remove the snapshots of other keys (another image version or pyvmm) that no lock holder
    is making: every entry but `keep`, the lock and builds in progress by live processes."""
    for entry in root.iterdir():
        if entry.name in (keep, ".lock") or entry.name.startswith(".build-"):
            continue
        shutil.rmtree(entry, ignore_errors=True)


def _make(work: pathlib.Path, image, accel_choice, parts: dict, progress) -> None:
    """Boot the default guest until its agent answers, pause it, save it into `work`."""
    from ..agent import AgentClient, AgentError
    from ..builder import build_vm
    from ..config import MachineConfig, RunOptions, VsockConfig
    from ..runner import with_default_guest
    from ..snapshot import save_snapshot

    started = time.monotonic()
    if progress is not None:
        progress(f"making the warm snapshot ({accel_choice.name}): booting the default guest once")
    uds = str(work / "build.vsock")
    # Kernel warnings reach the console (boot.log; and whoever reads a restored guest's console).
    machine = MachineConfig(memory=WARM_MEMORY, cpus=WARM_CPUS, vsock=VsockConfig(cid=WARM_CID, uds=uds),
                            cmdline=CONSOLE_LOGLEVEL)
    machine, _ = with_default_guest(machine, RunOptions(), WARM_COMMAND)
    console = bytearray()
    vm = build_vm(machine, console.extend, accel=accel_choice.create())
    try:
        vm.start()
        try:
            _wait_for_agent(vm, uds)
        except AgentError as exc:
            # a crash is named by its oops lines; the console tail otherwise (boot.log is not kept)
            tail = " | ".join(oops_lines(bytes(console))[:8]) or console[-300:].decode(errors="replace").strip().replace(
                "\r\n", " | ")
            outcome = vm.outcome.message if vm.outcome is not None else "still running"
            raise WarmSnapshotError(f"making the warm snapshot: the guest agent did not answer ({exc}); "
                                    f"guest {outcome}; console: {tail}") from None
        vm.pause()
        save_snapshot(vm, work / STATE_FILE, work / MEMORY_FILE)
    finally:
        vm.close()
        (work / BOOT_LOG).write_bytes(bytes(console))
    sizes = {name: (work / name).stat().st_size for name in (STATE_FILE, MEMORY_FILE)}
    meta = {"parts": parts, "sizes": sizes, "made_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "make_seconds": round(time.monotonic() - started, 1)}
    (work / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    try:
        os.unlink(uds)
    except OSError:
        pass
    if progress is not None:
        progress(f"warm snapshot made in {meta['make_seconds']} s")


def with_vsock_socket(uds: str):
    """A state rewrite for load_snapshot(prepare=): the restored VM's vsock socket is `uds`."""
    def prepare(state):
        machine = state.machine
        return replace(state, machine=replace(machine, vsock=replace(machine.vsock, uds=uds)))
    return prepare


def _wait_for_agent(vm, uds: str) -> None:
    """The guest agent's first answer, asked in short rounds so a guest that ended (a panic)
    is noticed at once rather than after the whole BOOT_TIMEOUT."""
    from ..agent import AgentClient, AgentError

    deadline = time.monotonic() + BOOT_TIMEOUT
    while True:
        remaining = deadline - time.monotonic()
        try:
            AgentClient(uds, connect_timeout=max(min(AGENT_ROUND, remaining), 0.1)).exec(["true"])
            return
        except AgentError:
            if vm.outcome is not None or time.monotonic() >= deadline:
                raise
            time.sleep(0.1)  # (a refusal can come at once: no busy loop)

