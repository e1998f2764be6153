"""x86 conformance: the test kernels of tests/conformance/kernels on pyvmm and on QEMU.

Each kernel computes its expectations from the Intel SDM (or the Multiboot specification) and
prints ok / FAIL per check (helpers/conformance.py). Every backend must pass every check except
the deviations listed in helpers/conformance.py (DEVIATIONS), each with its reason; a listed
deviation must still deviate (strictly), so a fix makes this test fail until the entry goes.
QEMU (TCG) is the oracle where it is right; where it is wrong the SDM decides, and its entry
there says so. scripts/conformance.py prints the same runs as a table per area.
"""

from __future__ import annotations

import pytest
from helpers import conformance as C
from helpers.conformance import DEVIATIONS, NO_DONE, declared_checks, skip_reason

@pytest.mark.parametrize("backend", C.BACKENDS)
@pytest.mark.parametrize("kernel", C.kernels())
def test_kernel(kernel: str, backend: str) -> None:
    reason = skip_reason(backend, kernel)
    if reason:
        pytest.skip(reason)
    run = C.run(kernel, backend, timeout=30 if (backend, kernel) in NO_DONE else 120)
    problems = []
    for check in declared_checks(kernel):
        outcome = run.outcome(check)
        deviation = DEVIATIONS.get((backend, check))
        if deviation is None and outcome not in ("ok", "skip"):
            problems.append(f"{check}: {outcome} {run.results.get(check, ('', ''))[1]}")
        elif deviation is not None and outcome == "ok":
            problems.append(f"{check}: passes now; drop its deviation ({deviation})")
    expect_done = (backend, kernel) not in NO_DONE
    if run.done != expect_done:
        problems.append("the kernel " + ("did not reach DONE" if expect_done else "reached DONE now: update NO_DONE"))
    elif run.done and run.exit_value != run.failed:
        problems.append(f"exit status {run.status}: the debug exit should carry the {run.failed} failed check(s)")
    assert not problems, "\n".join(problems) + "\n--- output ---\n" + run.output[-3000:]


def test_every_deviation_names_a_declared_check() -> None:
    declared = {check for kernel in C.kernels() for check in declared_checks(kernel)}
    assert not {check for _, check in DEVIATIONS} - declared
