"""`pyvmm ui` end to end in headless Chromium with a real VM (the default Debian guest on the
software CPU here): the create form's field errors, a VM created from the page and listed as
running, its console's prompt and a typed command's output (in two viewers at once),
suspend/resume from the page as `pyvmm list` sees it and the other way round, clone and
delete (by keyboard), the VM page's
charts, device tree, balloon control, virtio-mem resized, a disk attached and detached (hotplug), and a snapshot taken, destroyed and restored (an open
console page attaching again by itself), shutdown (the power button) and start, and `pyvmm ui` stopping
without touching the VM. One boot for the module; the tests run in order and share it.

The VM's kernel command line gets CONSOLE_LOGLEVEL through the form's kernel-arguments field,
and its console history passes the kernel-warning gate (pyvmm.images.kernel_warnings) before
each of its runs ends, as in tests/manage. Screenshots: tmp/artifacts/ui/*.png."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest
from helpers.ui_process import UiProcess, js_errors
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from pyvmm.images.kernel_warnings import CONSOLE_LOGLEVEL, describe, find_kernel_warnings
from pyvmm.manage.client import connect
from pyvmm.manage.launch import wait_exit

BOOT_TIMEOUT = 400
PROMPT = "pyvmm:~#"


@pytest.fixture(scope="module")
def image():
    from pyvmm.images import default_image

    return default_image()


@pytest.fixture(scope="module")
def env(tmp_path_factory, image):
    root = tmp_path_factory.mktemp("ui")
    values = dict(os.environ, XDG_CONFIG_HOME=str(root / "cfg"), XDG_RUNTIME_DIR=str(root / "rt"),
                  XDG_DATA_HOME=str(root / "data"))
    host = connect(root / "cfg" / "pyvmm" / "vms", root / "rt" / "pyvmm")
    yield values, host
    for name in host.names():  # nothing outlives the module; every console passes the gate
        vm = host.vm(name)
        warnings = find_kernel_warnings(vm.console_history())
        pid = vm.run.pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            wait_exit(pid, 30)
        assert not warnings, describe(warnings)


@pytest.fixture(scope="module")
def ui(env):
    process = UiProcess(env[0])
    yield process
    process.stop()


def cli(env, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "pyvmm.cli", *args], capture_output=True, env=env[0], timeout=300,
                            text=True)
    assert result.returncode == 0, (args, result.stderr)
    return result.stdout


def listed_state(env, name: str) -> str | None:
    match = re.search(rf"^ {re.escape(name)}\s+(\S+(?: off)?)", cli(env, "list", "--all"), re.M)
    return match.group(1) if match else None


def wait(driver, condition, timeout: float = 30, message: str = "", show=None):
    """Wait for `condition(driver)`; on a timeout the message says what `show(driver)` saw."""
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.25).until(lambda d: condition(d), message)
    except TimeoutException:
        seen = show(driver) if show is not None else driver.find_element(By.TAG_NAME, "main").text
        raise AssertionError(f"{message or 'timed out'} after {timeout:g} s; the page shows:\n{seen[-3000:]}") from None


def shot(driver, artifacts, name: str) -> None:
    """The whole page (the window made as tall as the page for the picture)."""
    width, height = driver.get_window_size()["width"], driver.get_window_size()["height"]
    page_height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, max(height, page_height + 120))
    try:
        driver.save_screenshot(str(artifacts / f"{name}.png"))
    finally:
        driver.set_window_size(width, height)


def row_state(driver, name: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, f'tr[data-vm="{name}"] td.state').text


def click_action(driver, name: str, action: str, confirm: bool = False) -> None:
    driver.find_element(By.CSS_SELECTOR, f'tr[data-vm="{name}"] button[data-action="{action}"]').click()
    if confirm:
        wait(driver, lambda d: d.find_element(By.ID, "ask").is_displayed())
        driver.find_element(By.ID, "ask-ok").click()


def fill(driver, fields: dict[str, str]) -> None:
    for field, value in fields.items():
        element = driver.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)


def test_a_bad_field_in_the_create_form_shows_its_error_next_to_it(browser, ui, env, artifacts):
    browser.get(ui.url)  # the printed URL: sets the cookie, drops the token from the address
    assert browser.current_url == f"{ui.base}/"
    browser.get(f"{ui.base}/create")
    fill(browser, {"name": "alpha", "memory": "lots"})
    browser.find_element(By.ID, "submit").click()
    error = wait(browser, lambda d: d.find_element(By.ID, "memory-error").text, message="no error shown")
    assert error == "must be an integer (got 'lots')"
    memory = browser.find_element(By.ID, "memory")
    assert memory.get_attribute("aria-invalid") == "true"
    assert browser.switch_to.active_element == memory  # focus goes to the field at fault
    assert "memory-error" in memory.get_attribute("aria-describedby")
    shot(browser, artifacts, "create-error")
    assert listed_state(env, "alpha") is None  # nothing was defined
    assert js_errors(browser) == []


def test_a_vm_created_from_the_page_is_listed_running(browser, ui, env, artifacts):
    browser.get(f"{ui.base}/create")
    fill(browser, {"name": "alpha", "memory": "256", "kernel_args": CONSOLE_LOGLEVEL, "virtio_mem": "256"})
    browser.find_element(By.ID, "balloon").click()
    browser.find_element(By.ID, "submit").click()
    wait(browser, lambda d: d.current_url == f"{ui.base}/vm/alpha", timeout=120, message="not taken to the VM's page")
    assert listed_state(env, "alpha") == "running"
    browser.get(f"{ui.base}/")
    wait(browser, lambda d: row_state(d, "alpha") == "running")
    row = browser.find_element(By.CSS_SELECTOR, 'tr[data-vm="alpha"]')
    assert "256 MiB" in row.text and re.search(r"\b(tcg|kvm)\b", row.text), row.text
    # the second poll has a rate: the CPU and exits graphs draw a line and say their latest value
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, 'tr[data-vm="alpha"] td.cpu polyline')) == 1, timeout=20)
    label = row.find_element(By.CSS_SELECTOR, "td.exits svg").get_attribute("aria-label")
    assert re.match(r"VM exits per second of alpha: latest [\d.]+", label), label
    shot(browser, artifacts, "list")
    assert js_errors(browser) == []


def terminal_text(driver) -> str:
    return driver.find_element(By.CSS_SELECTOR, "#terminal .xterm-rows").text


def type_into_console(driver, text: str) -> None:
    driver.find_element(By.CSS_SELECTOR, "#terminal .xterm-helper-textarea").send_keys(text + Keys.ENTER)


def console_wait(driver, condition, message: str, timeout: float = 60):
    return wait(driver, condition, timeout, message,
                show=lambda d: f"{terminal_text(d)}\n[status: {d.find_element(By.ID, 'status').text}]")


def test_the_console_shows_the_prompt_and_a_typed_commands_output_in_two_viewers(browser, ui, env, artifacts):
    browser.get(f"{ui.base}/vm/alpha/console")
    console_wait(browser, lambda d: "attached" in d.find_element(By.ID, "status").text, "console not attached")
    type_into_console(browser, "")  # a fresh prompt, whether the boot is over or not yet
    console_wait(browser, lambda d: PROMPT in terminal_text(d), "no prompt on the console", BOOT_TIMEOUT)
    type_into_console(browser, "echo ui-$((6*7))")
    console_wait(browser, lambda d: re.search(r"^ui-42\s*$", terminal_text(d), re.M), "no command output")
    first = browser.current_window_handle
    browser.switch_to.new_window("tab")
    try:
        browser.get(f"{ui.base}/vm/alpha/console")
        console_wait(browser, lambda d: "ui-42" in terminal_text(d), "the second viewer has no history")
        type_into_console(browser, "echo second-$((1+1))")
        console_wait(browser, lambda d: re.search(r"^second-2\s*$", terminal_text(d), re.M), "no output in viewer 2")
        assert js_errors(browser) == []
        browser.close()
    finally:
        browser.switch_to.window(first)
    console_wait(browser, lambda d: re.search(r"^second-2\s*$", terminal_text(d), re.M), "the first viewer missed it")
    shot(browser, artifacts, "console")
    assert js_errors(browser) == []


def test_suspend_clone_delete_and_resume_from_the_page_are_what_pyvmm_list_sees(browser, ui, env, artifacts):
    browser.get(f"{ui.base}/")
    wait(browser, lambda d: row_state(d, "alpha") == "running")
    click_action(browser, "alpha", "suspend")
    wait(browser, lambda d: row_state(d, "alpha") == "paused")
    assert listed_state(env, "alpha") == "paused"
    shot(browser, artifacts, "list-paused")

    # a paused VM can be cloned (virt-clone's rule: its disks stand still); by keyboard alone
    clone = browser.find_element(By.CSS_SELECTOR, 'tr[data-vm="alpha"] button[data-action="clone"]')
    wait(browser, lambda d: clone.is_enabled())
    clone.send_keys(Keys.ENTER)
    wait(browser, lambda d: d.find_element(By.ID, "ask").is_displayed())
    name = browser.switch_to.active_element  # the dialog's input has the focus
    assert name.get_attribute("id") == "ask-input" and name.get_attribute("value") == "alpha-clone"
    name.send_keys(Keys.ENTER)
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, 'tr[data-vm="alpha-clone"]'), message="no clone listed")
    wait(browser, lambda d: row_state(d, "alpha-clone") == "shut off")
    assert listed_state(env, "alpha-clone") == "shut off"
    click_action(browser, "alpha-clone", "delete", confirm=True)
    wait(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, 'tr[data-vm="alpha-clone"]'), message="clone still listed")
    assert listed_state(env, "alpha-clone") is None

    resume = browser.find_element(By.CSS_SELECTOR, 'tr[data-vm="alpha"] button[data-action="resume"]')
    resume.send_keys(Keys.ENTER)
    wait(browser, lambda d: row_state(d, "alpha") == "running")
    assert listed_state(env, "alpha") == "running"
    # a change made from the command line shows on the open page
    cli(env, "suspend", "alpha")
    wait(browser, lambda d: row_state(d, "alpha") == "paused", message="the page missed a suspend from the CLI")
    cli(env, "resume", "alpha")
    wait(browser, lambda d: row_state(d, "alpha") == "running")
    assert js_errors(browser) == []


def test_the_vm_page_charts_devices_snapshot_destroy_and_restore(browser, ui, env, artifacts):
    _, host = env
    browser.get(f"{ui.base}/vm/alpha")
    wait(browser, lambda d: d.find_element(By.ID, "state").text == "running")
    for chart in ("cpu", "vcpu", "exits", "block_read", "net_rx", "mem/guest_ram_resident_bytes"):
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, f'[data-chart="{chart}"] polyline'),
             message=f"no {chart} chart")
    assert browser.find_elements(By.CSS_SELECTOR, '#exit-charts [data-chart^="exit-"] polyline')
    assert browser.find_element(By.CSS_SELECTOR, '#devices [data-device="com1"]')
    assert "kernel_args" in browser.find_element(By.ID, "definition").get_attribute("textContent")
    # controls: the balloon (the VM has one); disk and NIC hotplug exactly when the VM's API offers them
    wait(browser, lambda d: d.find_element(By.ID, "controls").is_displayed(), message="no controls")
    operations = host.vm("alpha").api.get("/openapi.json")["paths"]
    for form, path in (("attach-disk", "/drives/{drive_id}"), ("attach-nic", "/network-interfaces/{iface_id}")):
        offered = "delete" in operations.get(path, {})
        assert bool(browser.find_elements(By.ID, form)) == offered, (form, offered)
    fill(browser, {"balloon-target": "32"})
    browser.find_element(By.CSS_SELECTOR, "#balloon-form button").click()
    wait(browser, lambda d: "balloon target 32 MiB: done" in d.find_element(By.ID, "control-status").text)
    assert host.vm("alpha").config()["balloon"]["amount_mib"] == 32
    wait(browser, lambda d: "32.0 MiB" in d.find_element(By.CSS_SELECTOR, '[data-chart="mem/balloon_target_bytes"]').text,
         message="the stats' balloon target is not charted")

    # virtio-mem: 128 MiB plugged into the guest from the page (the guest's driver plugs the blocks)
    fill(browser, {"virtio-mem-size": "128"})
    browser.find_element(By.CSS_SELECTOR, "#virtio-mem-form button").click()
    wait(browser, lambda d: "plugged 128 MiB of a 256 MiB region" in d.find_element(By.ID, "virtio-mem-status").text,
         timeout=120, message="the guest did not plug 128 MiB")
    assert host.vm("alpha").api.get("/pyvmm/memory/virtio-mem")["plugged_size_mib"] == 128

    # hotplug: a disk plugged in and out from the page (the guest ejects it for the detach)
    disk = host.run_root.parent.parent / "hot.img"
    disk.write_bytes(bytes(1 << 20))
    fill(browser, {"attach-disk-id": "hot", "attach-disk-path": str(disk)})
    browser.find_element(By.CSS_SELECTOR, "#attach-disk button").click()
    wait(browser, lambda d: "attach disk hot: done" in d.find_element(By.ID, "control-status").text, timeout=60)
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, 'tr[data-hotplug="hot"]'))
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#devices [data-device="hot"]'))
    assert [drive["drive_id"] for drive in host.vm("alpha").config()["drives"]] == ["hot"]
    shot(browser, artifacts, "vm-disk-attached")
    browser.find_element(By.CSS_SELECTOR, 'tr[data-hotplug="hot"] button').click()
    wait(browser, lambda d: "detach disk hot: done" in d.find_element(By.ID, "control-status").text, timeout=120)
    wait(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, 'tr[data-hotplug="hot"]'))
    assert host.vm("alpha").config()["drives"] == []

    fill(browser, {"snapshot-label": "first"})
    browser.find_element(By.CSS_SELECTOR, "#take-snapshot button").click()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, 'tr[data-snapshot="first"]'), timeout=120)
    state_file = host.run_root.parent.parent / "data" / "pyvmm" / "snapshots" / "alpha" / "first.state"
    assert state_file.exists() and state_file.with_name("first.state.mem").exists()
    wait(browser, lambda d: d.find_element(By.ID, "state").text == "running")  # paused for the snapshot, resumed after
    assert not list(state_file.parent.glob(".*"))  # written under a hidden name, renamed once whole
    shot(browser, artifacts, "vm")

    warnings = find_kernel_warnings(host.vm("alpha").console_history())  # this run's history goes with it
    assert not warnings, describe(warnings)
    vm_page = browser.current_window_handle
    browser.switch_to.new_window("tab")  # a console stays open across the destroy and the restore
    browser.get(f"{ui.base}/vm/alpha/console")
    console_wait(browser, lambda d: "attached" in d.find_element(By.ID, "status").text, "console not attached")
    console_tab = browser.current_window_handle
    browser.switch_to.window(vm_page)
    browser.find_element(By.CSS_SELECTOR, '#actions button[data-action="destroy"]').click()
    wait(browser, lambda d: d.find_element(By.ID, "ask").is_displayed())
    browser.find_element(By.ID, "ask-ok").click()
    wait(browser, lambda d: d.find_element(By.ID, "state").text == "shut off", timeout=60)
    assert listed_state(env, "alpha") == "shut off"
    # the event log has the change (through "unresponsive" if a poll caught the process ending)
    wait(browser, lambda d: re.search(r"(running|unresponsive) -> shut off", d.find_element(By.ID, "events").text))

    browser.find_element(By.CSS_SELECTOR, 'tr[data-snapshot="first"] button[data-action="restore"]').click()
    wait(browser, lambda d: d.find_element(By.ID, "ask").is_displayed())
    browser.find_element(By.ID, "ask-ok").click()
    wait(browser, lambda d: d.find_element(By.ID, "state").text == "running", timeout=120)
    assert listed_state(env, "alpha") == "running"
    shot(browser, artifacts, "vm-restored")
    assert js_errors(browser) == []

    # the console page attached again by itself, to the restored guest, which goes on from the snapshot
    browser.switch_to.window(console_tab)
    console_wait(browser, lambda d: d.find_element(By.ID, "status").text.startswith("attached"), "not attached again")
    type_into_console(browser, "echo restored-$((2+3))")
    console_wait(browser, lambda d: re.search(r"^restored-5\s*$", terminal_text(d), re.M), "no output after the restore")
    assert js_errors(browser) == []
    browser.close()
    browser.switch_to.window(vm_page)


def test_shutdown_and_start_from_the_page(browser, ui, env, artifacts):
    _, host = env
    browser.get(f"{ui.base}/vm/alpha")
    wait(browser, lambda d: d.find_element(By.ID, "state").text == "running")
    browser.find_element(By.CSS_SELECTOR, '#actions button[data-action="shutdown"]').click()  # the power button
    wait(browser, lambda d: d.find_element(By.ID, "state").text == "shut off", timeout=120, message="no poweroff")
    assert browser.find_element(By.ID, "s-outcome").text.startswith("poweroff")
    assert listed_state(env, "alpha") == "shut off"
    warnings = find_kernel_warnings(host.vm("alpha").console_history())  # the restored run's, before a new run
    assert not warnings, describe(warnings)
    browser.find_element(By.CSS_SELECTOR, '#actions button[data-action="start"]').click()
    wait(browser, lambda d: d.find_element(By.ID, "state").text == "running", timeout=120)
    assert listed_state(env, "alpha") == "running"
    assert js_errors(browser) == []


def test_stopping_pyvmm_ui_touches_no_vm(ui, env):
    pid = env[1].vm("alpha").run.pid()
    assert ui.stop() == 0
    assert listed_state(env, "alpha") == "running" and env[1].vm("alpha").run.pid() == pid
    assert "Traceback" not in "".join(ui.stderr)
