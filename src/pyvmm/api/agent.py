"""The guest agent over the per-VM API: /pyvmm/agent/exec and /pyvmm/agent/files.

The VM's process reaches its guest's agent the way `pyvmm exec` does: through the vsock
device's Unix socket (the configuration's vsock.uds_path) to vsock port 52. JSON carries
bytes as base64 (OpenAPI's format: byte). A command that runs and fails is a 200 with its
exit status; a request the agent cannot serve (no vsock device, no agent answering within
connect_timeout, no such guest file) is a 400 with one line.

Requests here do not take the VM's lock: a command may run for minutes, and other requests
(and other commands, each on its own connection) go on meanwhile.
"""

from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING, Any

from ..agent.client import AgentClient
from ..errors import ConfigError
from .schema import AGENT_EXEC, AGENT_FILE, check_body

if TYPE_CHECKING:
    from .instance import VmInstance

CONNECT_TIMEOUT = 10


def _client(instance: "VmInstance", connect_timeout: int | None) -> AgentClient:
    from .instance import InvalidState

    with instance.lock:
        instance._require_vm()
        vsock = instance.spec.vsock
    if vsock is None:
        raise InvalidState("the VM has no vsock device: the guest agent needs one (PUT /vsock before starting)")
    return AgentClient(vsock["uds_path"], connect_timeout=connect_timeout or CONNECT_TIMEOUT)


def _text(value: str, where: str) -> str:
    if "\0" in value:
        raise ConfigError("must not contain NUL characters", where)
    return value


def _decode(value: str, where: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError("must be base64 (RFC 4648, with padding)", where) from None


def exec_command(instance: "VmInstance", body: Any) -> dict[str, Any]:
    """Run a command in the guest; its output (base64) and exit status."""
    request = check_body(body, AGENT_EXEC)
    argv = [_text(arg, f"argv[{index}]") for index, arg in enumerate(request["argv"])]
    if not argv or not argv[0]:
        raise ConfigError("must name a command", "argv")
    env = request.get("env") or {}
    for name, value in env.items():
        if not name or "=" in name or not isinstance(value, str):
            raise ConfigError("must map variable names (no '=') to strings", f"env.{name}")
        _text(name + value, f"env.{name}")
    stdin = _decode(request.get("stdin", ""), "stdin")
    cwd = _text(request["cwd"], "cwd") if "cwd" in request else None
    result = _client(instance, request.get("connect_timeout")).exec(
        argv, stdin, env=env, cwd=cwd, timeout=request.get("timeout"))
    return {"exit_status": result.status, "signal": result.signal,
            "stdout": base64.b64encode(result.stdout).decode(), "stderr": base64.b64encode(result.stderr).decode()}


def read_file(instance: "VmInstance", query: dict[str, str]) -> bytes:
    """A guest file's contents (GET ?path=...)."""
    path = query.get("path")
    if not path:
        raise ConfigError("is required: the guest file to read", "path")
    timeout = query.get("connect_timeout")
    if timeout is not None and not (timeout.isascii() and timeout.isdigit() and 1 <= int(timeout) <= 60):
        raise ConfigError(f"must be 1-60 seconds (got {timeout!r:.40})", "connect_timeout")
    return _client(instance, int(timeout) if timeout else None).read_file(_text(path, "path"))


def write_file(instance: "VmInstance", body: Any) -> None:
    """Create or replace a guest file with base64 `content`."""
    request = check_body(body, AGENT_FILE)
    path = _text(request["path"], "path")
    if not path:
        raise ConfigError("must name a guest file", "path")
    data = _decode(request["content"], "content")
    _client(instance, request.get("connect_timeout")).write_file(path, data, request.get("mode", 0o644))
