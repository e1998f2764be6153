"""The guest agent's host side: `AgentClient` runs commands in a guest and copies files over
vsock (protocol.py describes the wire format; images/agent.c is the guest side)."""

from .client import AgentClient, AgentError, AgentTimeout, AgentUnavailable, ExecResult, new_machine_id
from .protocol import AGENT_PORT

__all__ = ["AGENT_PORT", "AgentClient", "AgentError", "AgentTimeout", "AgentUnavailable", "ExecResult", "new_machine_id"]
