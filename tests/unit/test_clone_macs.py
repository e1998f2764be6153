"""A clone's MACs: which old address becomes which new one (clones.mac_changes), and the
request the agent gets to apply them (AgentClient.set_mac_addresses, against a fake agent)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pyvmm.agent.client import AgentClient, AgentError, ExecResult
from pyvmm.config import default_mac
from pyvmm.clones import mac_changes


def _state(*macs):
    return SimpleNamespace(machine=SimpleNamespace(nets=tuple(SimpleNamespace(mac=mac) for mac in macs)))


def test_each_nic_maps_its_old_address_to_the_clones():
    before = _state(None, "52:54:00:aa:bb:cc")
    after = _state("52:54:00:01:02:03", "52:54:00:04:05:06")
    assert mac_changes(before, after) == {default_mac(0): "52:54:00:01:02:03", "52:54:00:aa:bb:cc": "52:54:00:04:05:06"}
    assert default_mac(0) == "52:54:00:12:34:56" and default_mac(1) == "52:54:00:12:34:57"
    assert mac_changes(_state(), _state()) == {}


class FakeAgent(AgentClient):
    def __init__(self, status: int = 0, stderr: bytes = b"") -> None:
        super().__init__("/nonexistent")
        self.argv: list[str] = []
        self.result = ExecResult(b"", stderr, status)

    def exec(self, argv, stdin=b"", **kwargs):
        self.argv = argv
        return self.result


def test_the_agent_is_asked_for_old_new_pairs_in_the_guests_spelling():
    agent = FakeAgent()
    agent.set_mac_addresses({"52:54:00:12:34:56": "52:54:00:AB:CD:EF"})
    assert agent.argv[:2] == ["sh", "-c"] and agent.argv[3:] == ["set-macs", "52:54:00:12:34:56", "52:54:00:ab:cd:ef"]
    assert "ip link set dev" in agent.argv[2]


def test_a_bad_address_or_a_failure_in_the_guest_is_one_line():
    with pytest.raises(ValueError, match="not a MAC address"):
        FakeAgent().set_mac_addresses({"52:54:00:12:34": "52:54:00:ab:cd:ef"})
    with pytest.raises(AgentError, match=r"^guest agent: setting MAC addresses: no interface has MAC address x$"):
        FakeAgent(1, b"something\nno interface has MAC address x\n").set_mac_addresses({default_mac(0): default_mac(1)})
