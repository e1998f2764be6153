"""`pyvmm top`'s rates and tables from stats samples (a fake host; no VM)."""

from __future__ import annotations

from pyvmm.manage import top


class FakeInfo:
    def __init__(self, name: str, pid: int) -> None:
        self.name, self.pid, self.state, self.active, self.memory_mib = name, pid, "running", True, 256


class FakeVm:
    def __init__(self, host, name):
        self.host, self.name = host, name

    def info(self):
        return FakeInfo(self.name, 100 + len(self.name))

    def stats(self):
        return self.host.stats[self.name]


class FakeHost:
    def __init__(self):
        self.stats = {}

    def list(self):
        return [FakeInfo(name, 100 + len(name)) for name in self.stats]

    def vm(self, name):
        return FakeVm(self, name)


def stats(cpu: float, exits: dict[str, int], rss: int = 64 << 20) -> dict:
    return {"cpu_user_s": cpu, "cpu_system_s": 0.0, "exits": exits, "exits_total": sum(exits.values()),
            "rss_bytes": rss, "vcpu_count": 1}


def test_rates_come_from_the_change_between_samples(monkeypatch):
    host = FakeHost()
    clock = iter([10.0, 12.0])
    monkeypatch.setattr(top.time, "monotonic", lambda: next(clock))
    host.stats = {"a": stats(1.0, {"mmio": 100}), "bb": stats(5.0, {"mmio": 10, "halts": 0})}
    sampler = top.Sampler(host)
    first = sampler.sample()
    assert [row.cpu_percent for row in first] == [None, None]  # no rate before a second sample
    host.stats = {"a": stats(2.0, {"mmio": 300}), "bb": stats(5.5, {"mmio": 10, "halts": 40})}
    rows = {row.name: row for row in sampler.sample()}
    assert rows["a"].cpu_percent == 50.0 and rows["a"].exits_per_s == 100.0
    assert rows["bb"].exit_rates == {"mmio": 0.0, "halts": 20.0}
    table = top.render(list(rows.values()), "exits")
    lines = table.splitlines()
    assert lines[2].startswith("a ") and lines[3].startswith("bb ")  # sorted by exits/s
    assert "50.0" in lines[2] and "64" in lines[2]
    drill = top.render_exits(rows["bb"]).splitlines()
    assert drill[2].split() == ["halts", "40", "20"]
