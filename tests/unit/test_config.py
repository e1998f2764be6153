"""Size parsing, device options, MachineConfig and RunOptions validation (src/pyvmm/config.py),
and how the CLI names the fields an error is about."""

import dataclasses

import pytest

from pyvmm.cli import cli_name
from pyvmm.config import (ConfigError, ConsolePort, DiskConfig, MachineConfig, NetConfig, RunOptions, VsockConfig,
                          parse_size, parse_transport)
from pyvmm.errors import PyvmmError, UserError

RUN_FIELDS = {"timeout", "accel", "reboot", "console_log", "system_map"}


def validate(kwargs, max_vcpus=None):
    """MachineConfig or RunOptions, whichever the keyword arguments belong to."""
    if set(kwargs) <= RUN_FIELDS:
        RunOptions(**kwargs).validate()
    else:
        MachineConfig(**kwargs).validate(max_vcpus=max_vcpus)


def as_cli_says(exc: ConfigError) -> str:
    return exc.render(cli_name(exc.field)) if exc.field else str(exc)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


@pytest.mark.parametrize(
    "text, expected",
    [
        ("256M", 256 * MiB),
        ("256m", 256 * MiB),
        ("1G", GiB),
        ("512", 512 * MiB),          # no unit: MiB
        ("64k", 64 * KiB),
        ("64K", 64 * KiB),
        ("2GiB", 2 * GiB),
        ("2gib", 2 * GiB),
        ("16MB", 16 * MiB),
        ("1T", 1 << 40),
        ("  128M  ", 128 * MiB),
        ("\t4G\n", 4 * GiB),
        ("8 M", 8 * MiB),
        ("0", 0),
    ],
)
def test_parse_size_accepts(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "   ", "-1M", "1.5G", "12X", "M", "G1", "1 G G", "0x100M", "1e3", "banana"])
def test_parse_size_rejects(text):
    with pytest.raises(ConfigError) as info:
        parse_size(text)
    message = str(info.value)
    assert "\n" not in message
    assert repr(text) in message       # the offending input is quoted back


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_config_error_is_a_user_error_under_the_root():
    assert issubclass(ConfigError, UserError) and issubclass(UserError, PyvmmError)


def test_default_config_is_valid():
    MachineConfig().validate()
    MachineConfig().validate(max_vcpus=1)
    RunOptions().validate()


def test_configs_are_frozen_data():
    machine = MachineConfig(memory=64 << 20)
    with pytest.raises(dataclasses.FrozenInstanceError):
        machine.memory = 128 << 20  # type: ignore[misc]
    assert dataclasses.replace(machine, cpus=2).cpus == 2 and machine.cpus == 1
    assert not {f.name for f in dataclasses.fields(MachineConfig)} & RUN_FIELDS


@pytest.mark.parametrize(
    "kwargs, max_vcpus, needle",
    [
        ({"memory": 0}, None, "--memory"),
        ({"memory": -MiB}, None, "--memory"),
        ({"memory": MiB}, None, "--memory"),
        ({"memory": 2 * MiB - 4 * KiB}, None, "--memory"),
        ({"memory": 2 * MiB + 1}, None, "--memory"),
        ({"memory": 256 * MiB + 512}, None, "--memory"),
        ({"cpus": 0}, None, "--cpus"),
        ({"cpus": -3}, None, "--cpus"),
        ({"cpus": 5}, 4, "--cpus"),
        ({"cpus": 256}, None, "--cpus"),
        ({"timeout": 0}, None, "--timeout"),
        ({"timeout": -1.5}, None, "--timeout"),
        ({"accel": "qemu"}, None, "--accel"),
        ({"boot": "uefi"}, None, "--boot"),
        ({"console": "vga"}, None, "--console"),
        ({"rng": "isa"}, None, "--rng"),
        ({"cpu_hide": frozenset({"notafeature"})}, None, "--cpu-hide"),
    ],
)
def test_validate_rejects(kwargs, max_vcpus, needle):
    with pytest.raises(ConfigError) as info:
        validate(kwargs, max_vcpus=max_vcpus)
    message = as_cli_says(info.value)
    assert message and "\n" not in message and "\n" not in str(info.value)
    assert needle in message
    # the error names the config field, not the flag: an API can name it its own way
    assert info.value.field == next(iter(kwargs))
    assert str(info.value).startswith(info.value.field) and "--" not in str(info.value)


def test_cpu_hide_takes_feature_names_and_bit_names():
    MachineConfig(cpu_hide=frozenset({"xsave", "leaf 0x7.0 EDX bit 26"})).validate(max_vcpus=8)


def test_cpus_over_host_limit_names_the_limit():
    with pytest.raises(ConfigError) as info:
        MachineConfig(cpus=9).validate(max_vcpus=8)
    assert "8" in str(info.value) and "9" in str(info.value)


@pytest.mark.parametrize("machine, field, cli", [
    (MachineConfig(disks=(DiskConfig("a.img"), DiskConfig("b.img", serial="x" * 21))), "disks[1].serial", "--disk serial"),
    (MachineConfig(disks=(DiskConfig(),)), "disks[0]", "--disk"),
    (MachineConfig(disks=(DiskConfig("a.img", transport="isa"),)), "disks[0].transport", "--disk transport"),
    (MachineConfig(nets=(NetConfig(mac="01:00:00:00:00:01"),)), "nets[0].mac", "--net mac"),
    (MachineConfig(vsock=VsockConfig(2, "/v")), "vsock.cid", "--vsock cid"),
    (MachineConfig(console_ports=(ConsolePort("a", "/s1"), ConsolePort("a", "/s2"))), "console_ports[1]",
     "--console-port"),
    (MachineConfig(console_transport="isa"), "console_transport", "--console"),
])
def test_device_errors_name_the_field_and_its_index(machine, field, cli):
    with pytest.raises(ConfigError) as info:
        machine.validate()
    assert info.value.field == field
    assert as_cli_says(info.value).startswith(cli)


@pytest.mark.parametrize(
    "kwargs, max_vcpus",
    [
        ({"memory": 2 * MiB}, None),            # the minimum
        ({"memory": 2 * MiB + 4 * KiB}, None),  # 4 KiB multiple
        ({"memory": 8 * GiB}, None),
        ({"cpus": 4}, 4),                       # exactly the host limit
        ({"cpus": 255}, None),
        ({"timeout": 0.001}, None),
        ({"timeout": None}, None),
    ],
)
def test_validate_accepts_edges(kwargs, max_vcpus):
    validate(kwargs, max_vcpus=max_vcpus)


# --- device options -----------------------------------------------------------------------------

def test_cli_names_of_fields():
    assert cli_name("memory") == "--memory"
    assert cli_name("disks[3].serial") == "--disk serial"
    assert cli_name("disks[0].vhost_user") == "--disk vhost-user"
    assert cli_name("disks[2].path") == "--disk"
    assert cli_name("console_ports[0]") == "--console-port"
    assert cli_name("system_map") == "--system-map"


def test_disk_options():
    assert DiskConfig.parse("a.img,readonly,serial=s1,transport=mmio") == DiskConfig("a.img", True, "s1", "mmio")
    assert DiskConfig.parse("a.img") == DiskConfig("a.img", False, None, "pci")
    assert DiskConfig.parse("vhost-user=/run/blk.sock").vhost_user == "/run/blk.sock"


@pytest.mark.parametrize("text,message", [
    ("", "needs an image path"),
    ("a.img,fast", "unknown flag 'fast'"),
    ("a.img,cache=none", "unknown option 'cache'"),
    ("a.img,transport=isa", "transport must be pci or mmio"),
    ("a.img,serial=" + "x" * 21, "longer than 20 bytes"),
    ("a.img,vhost-user=/s", "not both"),
])
def test_bad_disk_options(text, message):
    with pytest.raises(ConfigError, match=message):
        DiskConfig.parse(text)


def test_net_and_vsock_options():
    assert NetConfig.parse("tap=auto,mac=52:54:00:12:34:56") == NetConfig("auto", "52:54:00:12:34:56", "pci")
    assert VsockConfig.parse("cid=3,uds=/tmp/v,transport=mmio") == VsockConfig(3, "/tmp/v", "mmio")
    for text, message in (("tap=t0,mac=01:00:00:00:00:01", "not a unicast MAC"), ("tap0", "key=value")):
        with pytest.raises(ConfigError, match=message):
            NetConfig.parse(text)
    for text, message in (("cid=2,uds=/v", "start at 3"), ("cid=x,uds=/v", "not a number"), ("cid=3", "needs cid")):
        with pytest.raises(ConfigError, match=message):
            VsockConfig.parse(text)


def test_console_transport():
    assert parse_transport("", "--console") == "pci"
    assert parse_transport("transport=mmio", "--console") == "mmio"
    with pytest.raises(ConfigError, match="unexpected 'foo'"):
        parse_transport("foo", "--console")
    with pytest.raises(ConfigError) as info:
        parse_transport("transport=isa")
    assert info.value.field == "console_transport"


def test_size_errors_name_the_field_when_given():
    with pytest.raises(ConfigError) as info:
        parse_size("1.5G", "memory")
    assert info.value.field == "memory" and as_cli_says(info.value).startswith("--memory: invalid size '1.5G'")


def test_console_port_option():
    assert ConsolePort.parse("log=/tmp/s") == ConsolePort("log", "/tmp/s")
    with pytest.raises(ConfigError, match="expected NAME=SOCKET_PATH"):
        ConsolePort.parse("log")


def test_an_unknown_accelerator_names_the_field():
    from pyvmm.accel.select import choose_accelerator

    with pytest.raises(ConfigError) as info:
        choose_accelerator("qemu")
    assert info.value.field == "accel" and as_cli_says(info.value).startswith("--accel must be one of")


def test_disk_and_net_rate_limits_in_the_compact_syntax_and_through_a_saved_description():
    from helpers.state import through_json
    from pyvmm.config import DiskConfig, MachineConfig, NetConfig, RateLimit
    from pyvmm.vm_state import MachineDescription

    disk = DiskConfig.parse("a.img,bps=10M,iops=200")
    assert disk.rate_limit == RateLimit.per_second(10 << 20, 200)
    net = NetConfig.parse("tap=auto,rx-bps=1M,tx-pps=1000")
    assert net.rx_rate_limit == RateLimit.per_second(1 << 20, None)
    assert net.tx_rate_limit == RateLimit.per_second(None, 1000)
    assert DiskConfig.parse("a.img,bps=0").rate_limit is None
    machine = MachineConfig(disks=(disk,), nets=(net,))
    assert through_json(MachineDescription.from_config(machine)).to_config() == machine
    with pytest.raises(ConfigError) as info:
        DiskConfig.parse("a.img,bps=fast")
    assert info.value.field == "disks.bps"
    with pytest.raises(ConfigError, match="vhost-user"):
        DiskConfig.parse("vhost-user=/tmp/s,iops=5")
