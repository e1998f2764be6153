"""The software CPU's Python event delivery (accel/tcg/delivery.py) against the same kernels.

pyvmm delivers exceptions with QEMU's own code inside the engine where its libunicorn build
allows (native_delivery.py); elsewhere it falls back to delivery.py, which
PYVMM_TCG_EXCEPTIONS=python selects here. Both must give the kernels' SDM answers: every check
ok except the software CPU's listed deviations. Task gates are not in delivery.py (kernel
`gates` is left out: a task switch raises #GP there).
"""

from __future__ import annotations

import pytest
from helpers import conformance as C

KERNELS = ("control", "eventorder", "events", "idt64", "ioapic", "lapic", "paging", "pic_pit", "realmode",
           "user32")


@pytest.mark.parametrize("kernel", KERNELS)
def test_python_delivery_gives_the_sdm_answers(kernel: str, monkeypatch) -> None:
    monkeypatch.setenv("PYVMM_TCG_EXCEPTIONS", "python")
    run = C.run(kernel, "tcg", timeout=120)
    problems = []
    for check in C.declared_checks(kernel):
        outcome = run.outcome(check)
        if outcome not in ("ok", "skip") and ("tcg", check) not in C.DEVIATIONS:
            problems.append(f"{check}: {outcome} {run.results.get(check, ('', ''))[1]}")
    if not run.done:
        problems.append("the kernel did not reach DONE")
    assert not problems, "\n".join(problems) + "\n--- output ---\n" + run.output[-3000:]
