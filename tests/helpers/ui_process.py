"""`pyvmm ui` started as a user starts it, for the browser tests (tests/ui)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading


class UiProcess:
    """`pyvmm ui` as a user starts it; `url` is the URL it printed (with the token)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "pyvmm.cli", "ui"], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, env=env, text=True)
        line = self.process.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:(\d+)/\?token=(\S+))", line)
        assert match, f"pyvmm ui printed {line!r}; stderr: {self.process.stderr.read() if not line else ''}"
        self.url, self.port, self.token = match.group(1), int(match.group(2)), match.group(3)
        self.base = f"http://127.0.0.1:{self.port}"
        self.stderr: list[str] = []
        self._reader = threading.Thread(target=lambda: self.stderr.append(self.process.stderr.read()), daemon=True)
        self._reader.start()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        status = self.process.wait(30)
        self._reader.join(10)
        return status


def js_errors(driver) -> list[str]:
    """The page's errors since the last call (a script that throws fails its test); answers with an
    error status, which the pages expect and show, are the network's entries, not these."""
    return [entry["message"] for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE" and entry.get("source") != "network"]
