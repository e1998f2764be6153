"""Disposable guests started from the warm snapshot: pyvmm.Sandbox (sandbox.py), the guest
under it (guest.py), the warm snapshot itself (warm.py) and `pyvmm run -- CMD` from it (run.py)."""

from .sandbox import RunResult, Sandbox, SandboxError, SandboxFiles, SandboxTimeout

__all__ = ["RunResult", "Sandbox", "SandboxError", "SandboxFiles", "SandboxTimeout"]
