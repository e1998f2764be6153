"""Rate limiters through the per-VM API (Firecracker's rate_limiter objects): set before boot,
changed at run time on the device itself (a stand-in VM holding real device models), PATCH
semantics per bucket, errors as 400 naming the field, and `pyvmm ratelimit` on top."""

from __future__ import annotations

import argparse
import types

import pytest

from pyvmm.api.instance import VmInstance
from pyvmm.api.server import ApiServer
from pyvmm.api.states import RUNNING
from pyvmm.devices.rate_limiter import RateLimit, TokenBucketConfig
from pyvmm.devices.virtio.blk import VirtioBlock
from pyvmm.devices.virtio.net import VirtioNet
from pyvmm.iothread import IoThread
from pyvmm.manage import ratelimit_cli
from pyvmm.manage.client import ApiClient, ApiError
from pyvmm.net.tap import FdBackend

MB = {"size": 1 << 20, "refill_time": 1000}


@pytest.fixture
def setup(tmp_path):
    instance = VmInstance("rl")
    server = ApiServer(instance, tmp_path / "api.sock").start()
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 16))
    yield instance, ApiClient(tmp_path / "api.sock", timeout=10), str(disk)
    server.close()


def test_limits_given_before_boot_reach_the_machine_description(setup):
    instance, api, disk = setup
    api.put("/drives/root", {"drive_id": "root", "path_on_host": disk, "is_root_device": True,
                             "rate_limiter": {"bandwidth": MB, "ops": {"size": 100, "refill_time": 1000}}})
    api.put("/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0",
                                         "tx_rate_limiter": {"ops": {"size": 10, "refill_time": 100,
                                                                     "one_time_burst": 50}}})
    api.patch("/drives/root", {"drive_id": "root", "rate_limiter": {"ops": {"size": 0, "refill_time": 0}}})
    api.patch("/network-interfaces/eth0", {"iface_id": "eth0", "rx_rate_limiter": {"bandwidth": MB}})
    machine, _ = instance.spec.machine_config()
    assert machine.disks[0].rate_limit == RateLimit(bandwidth=TokenBucketConfig(1 << 20, 1000))  # ops removed
    assert machine.nets[0].tx_rate_limit == RateLimit(ops=TokenBucketConfig(10, 100, 50))
    assert machine.nets[0].rx_rate_limit == RateLimit(bandwidth=TokenBucketConfig(1 << 20, 1000))
    assert api.get("/vm/config")["drives"][0]["rate_limiter"] == {"bandwidth": MB}


@pytest.mark.parametrize("body,field", [
    ({"rate_limiter": {"bandwidth": {"size": 1}}}, "rate_limiter.bandwidth.refill_time"),
    ({"rate_limiter": {"bandwidth": {"size": -1, "refill_time": 1}}}, "rate_limiter.bandwidth.size"),
    ({"rate_limiter": {"iops": MB}}, "rate_limiter.iops"),
    ({"rate_limiter": {"ops": [1]}}, "rate_limiter.ops"),
])
def test_a_bad_rate_limiter_is_a_400_naming_the_field(setup, body, field):
    _, api, disk = setup
    with pytest.raises(ApiError) as error:
        api.put("/drives/d", {"drive_id": "d", "path_on_host": disk, "is_root_device": False, **body})
    assert error.value.status == 400 and error.value.fault_message.startswith(field + " ")


def test_a_vhost_user_drive_cannot_be_limited(setup):
    _, api, _ = setup
    with pytest.raises(ApiError) as error:
        api.put("/drives/v", {"drive_id": "v", "socket": "/tmp/vhost.sock", "is_root_device": False,
                              "rate_limiter": {"ops": MB}})
    assert error.value.status == 400 and error.value.fault_message.startswith("rate_limiter ")


class FakeTimers:
    def call_later(self, delay_ns, callback):
        return types.SimpleNamespace(cancel=lambda: None)


@pytest.fixture
def running(setup, tmp_path):
    """The instance as if started: a stand-in VM whose devices are real models."""
    import socket

    instance, api, disk = setup
    api.put("/drives/data", {"drive_id": "data", "path_on_host": disk, "is_root_device": False})
    api.put("/drives/root", {"drive_id": "root", "path_on_host": disk, "is_root_device": True,
                             "is_read_only": True})
    api.put("/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0",
                                         "rx_rate_limiter": {"ops": {"size": 5, "refill_time": 1000}}})
    root = VirtioBlock(disk, readonly=True, timers=FakeTimers())
    data = VirtioBlock(disk, readonly=True, timers=FakeTimers())
    pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    io = IoThread()
    net = VirtioNet(FdBackend(pair[0].fileno()), mac=bytes.fromhex("525400123456"), iothread=io,
                    rx_rate_limit=RateLimit(ops=TokenBucketConfig(5, 1000)))
    instance.vm = types.SimpleNamespace(devices={"root": root, "data": data, "eth0": net})  # device-tree ids: the API's
    instance.state = RUNNING
    yield instance, api, {"root": root, "data": data, "eth0": net}
    instance.vm, instance.state = None, "Not started"
    for device in (root, data):
        device.close()
    io.stop()
    for end in pair:
        end.close()


def test_patching_a_running_vm_changes_the_device_and_the_configuration(running):
    instance, api, devices = running
    api.patch("/drives/data", {"drive_id": "data", "rate_limiter": {"bandwidth": MB}})
    assert devices["data"].throttle.limit == RateLimit(bandwidth=TokenBucketConfig(1 << 20, 1000))
    assert devices["root"].throttle.limit is None        # the root drive (vda), not the first defined
    api.patch("/drives/data", {"drive_id": "data", "rate_limiter": {"ops": {"size": 7, "refill_time": 100}}})
    assert devices["data"].throttle.limit == RateLimit(bandwidth=TokenBucketConfig(1 << 20, 1000),
                                                       ops=TokenBucketConfig(7, 100))   # bandwidth kept
    api.patch("/network-interfaces/eth0", {"iface_id": "eth0", "tx_rate_limiter": {"bandwidth": MB}})
    net = devices["eth0"]
    assert net.tx_throttle.limit == RateLimit(bandwidth=TokenBucketConfig(1 << 20, 1000))
    assert net.rx_throttle.limit == RateLimit(ops=TokenBucketConfig(5, 1000))           # the other side kept
    config = api.get("/vm/config")
    assert config["network-interfaces"][0]["tx_rate_limiter"] == {"bandwidth": MB}
    api.patch("/drives/data", {"drive_id": "data", "rate_limiter": None})
    assert devices["data"].throttle.limit is None
    with pytest.raises(ApiError) as error:
        api.patch("/drives/data", {"drive_id": "data", "path_on_host": "/tmp/other.img"})
    assert error.value.status == 400 and "not supported" in error.value.fault_message
    with pytest.raises(ApiError) as error:
        api.patch("/network-interfaces/nope", {"iface_id": "nope", "rx_rate_limiter": None})
    assert error.value.status == 400 and error.value.fault_message.startswith("iface_id ")


def test_the_ratelimit_command(running, capsys):
    instance, api, devices = running

    class Handle:
        name = "rl"

        def config(self):
            return api.get("/vm/config")

        def set_rate_limit(self, device_id, **limits):
            from pyvmm.manage.client import VmHandle
            VmHandle.set_rate_limit(types.SimpleNamespace(_live_api=lambda: api), device_id, **limits)

    def args(device, **options):
        values = {name: None for name in (*ratelimit_cli.DRIVE_OPTIONS, *ratelimit_cli.NET_OPTIONS)}
        return argparse.Namespace(device=device, **{**values, **options})

    assert ratelimit_cli.run(Handle(), args("data", bps="10M", iops="200")) == 0
    assert devices["data"].throttle.limit == RateLimit.per_second(10 << 20, 200)
    assert capsys.readouterr().out == "data: 10 MiB/s, bucket 10 MiB; 200 requests/s, bucket 200 requests\n"
    ratelimit_cli.run(Handle(), args("data", iops="0"))
    assert devices["data"].throttle.limit == RateLimit.per_second(10 << 20, None)
    ratelimit_cli.run(Handle(), args("eth0", tx_pps="1000"))
    assert devices["eth0"].tx_throttle.limit == RateLimit.per_second(None, 1000)
    capsys.readouterr()
    ratelimit_cli.run(Handle(), args("eth0"))
    assert capsys.readouterr().out == ("eth0 receive: 5 packets/s, bucket 5 packets\n"
                                       "eth0 send: 1000 packets/s, bucket 1000 packets\n")
    from pyvmm.errors import UserError
    with pytest.raises(UserError, match="--rx-bps is not for a drive"):
        ratelimit_cli.run(Handle(), args("data", rx_bps="1M"))
    with pytest.raises(UserError, match="no drive or network interface 'sda'"):
        ratelimit_cli.run(Handle(), args("sda"))
    with pytest.raises(UserError, match="invalid rate"):
        ratelimit_cli.run(Handle(), args("data", bps="fast"))
