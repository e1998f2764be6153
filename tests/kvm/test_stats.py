"""GET /pyvmm/stats's parts on both CPU backends, from the tiny virtio-rng driver guest
(test_virtio_guest.py) whose ring the guest first breaks, then resets, then uses once."""

from __future__ import annotations

from pyvmm.kvm import Kvm
from pyvmm.kvm.stats import KVM_CAP_BINARY_STATS_FD

from test_virtio_guest import RngRun, check_request


def _kvm_has_binary_stats() -> bool:
    with Kvm() as kvm:
        return kvm.check_extension(KVM_CAP_BINARY_STATS_FD) > 0


def test_stats_count_exits_interrupts_device_requests_and_guest_ram(accel):
    run = RngRun(accel, mode=1)
    outcome = run.run()
    check_request(run, outcome, mode=1)
    stats = run.stats

    if accel == "kvm":
        expected = "kvm-binary-stats" if _kvm_has_binary_stats() else "pyvmm"
        # the console's LSR polls and THR writes are port I/O; the queue's registers are MMIO
        assert stats["exits_source"] == expected
        assert stats["exits"]["io"] > len(run.text) and stats["exits"]["mmio"] > 0, stats["exits"]
    else:
        assert stats["exits_source"] == "software-cpu"
        assert stats["exits"]["port_io"] > len(run.text) and stats["exits"]["mmio"] > 0, stats["exits"]
    assert stats["exits_total"] == sum(stats["exits"].values())
    assert stats["exits"] == stats["vcpus"][0]["exits"]
    if stats["exits_source"] != "pyvmm":
        assert isinstance(stats["interrupts_injected"], int)

    rng = stats["devices"]["virtio-rng"]
    # one request served after the reset; the broken ring counted once; nothing malformed
    assert (rng["requests"], rng["ring_failures"], rng["malformed_chains"], rng["needs_reset"]) == (1, 1, 0, False)

    memory = stats["memory"]
    assert memory["guest_ram_bytes"] == 16 << 20
    assert 0 < memory["guest_ram_resident_bytes"] <= 16 << 20
    assert [thread["label"] for thread in stats["vcpu_threads"]]  # the run loops that ran


def test_without_binary_stats_kvm_exits_are_pyvmms_own_count(monkeypatch):
    """A KVM without KVM_GET_STATS_FD: the exits that reached pyvmm, by KVM exit reason, and
    interrupts injected unknown (null) rather than made up."""
    from pyvmm.kvm.vcpu import VcpuFd

    monkeypatch.setattr(VcpuFd, "binary_stats", lambda self: None)
    run = RngRun("kvm", mode=0)
    outcome = run.run()
    check_request(run, outcome, mode=0)
    stats = run.stats
    assert stats["exits_source"] == "pyvmm" and stats["interrupts_injected"] is None
    assert stats["exits"]["io"] > len(run.text) and stats["exits"]["mmio"] > 0 and "other" not in stats["exits"]
