"""Browser tests of `pyvmm ui`: headless Chromium (Debian's chromium) driven by Selenium through
Debian's chromedriver (scripts/setup installs both). `pyvmm ui` runs as a child process over
VMs in the test's own config and runtime directories; screenshots of each page go to
$PYVMM_ARTIFACTS (default tmp/artifacts/ui in the checkout; not committed)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _browser_binaries() -> tuple[str, str] | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


@pytest.fixture(scope="session")
def artifacts() -> Path:
    path = Path(os.environ.get("PYVMM_ARTIFACTS") or ROOT / "tmp" / "artifacts") / "ui"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def browser():
    binaries = _browser_binaries()
    if binaries is None:  # scripts/setup installs them; a machine set up another way says what is missing
        pytest.fail("the browser tests need chromium and chromedriver (apt-get install chromium chromium-driver; "
                    "./scripts/setup does it as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binaries[0]
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1000", "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=binaries[1]), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
