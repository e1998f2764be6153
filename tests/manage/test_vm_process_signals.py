"""A managed VM's process signalled as early as anyone can know its pid (the pid file has just
appeared; the VM is not built yet): SIGTERM still ends it with a recorded `destroyed` outcome
naming the signal, never a record without an outcome (which `list` would call crashed)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from pyvmm.images.kernel_warnings import CONSOLE_LOGLEVEL
from pyvmm.manage.records import RunDir


def test_sigterm_as_soon_as_the_pid_file_exists_is_a_destroy_with_an_outcome(image, tmp_path):
    run = RunDir.of("early", tmp_path / "rt")
    run.prepare()
    run.definition_file.write_text(json.dumps({"machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
                                               "pyvmm": {"kernel_args": CONSOLE_LOGLEVEL}}))
    process = subprocess.Popen([sys.executable, "-m", "pyvmm.manage.vmprocess", str(run.path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not run.pid_file.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.001)
    process.send_signal(signal.SIGTERM)
    assert process.wait(300) == 0, process.stderr.read()
    outcome = run.outcome()
    assert outcome is not None and outcome["reason"] == "destroyed", outcome
    assert "SIGTERM" in outcome["message"]
