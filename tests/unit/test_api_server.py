"""The per-VM API without a guest: routing, status codes, field-by-field validation, the
OpenAPI document in sync with the routes. An in-process server on a temporary socket."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading

import pytest

from pyvmm.api import schema
from pyvmm.api.instance import VmInstance
from pyvmm.api.openapi import document
from pyvmm.api.server import ROUTES, ApiServer
from pyvmm.manage.client import ApiClient, ApiError


@pytest.fixture
def api(tmp_path):
    path = tmp_path / "api.sock"
    server = ApiServer(VmInstance("test-vm"), path).start()
    yield ApiClient(path, timeout=10)
    server.close()


@pytest.fixture
def files(tmp_path):
    kernel, disk = tmp_path / "vmlinux", tmp_path / "disk.img"
    kernel.write_bytes(b"\x7fELF")
    disk.write_bytes(bytes(4096))
    return {"kernel": str(kernel), "disk": str(disk), "metrics": str(tmp_path / "metrics.json")}


def raw(api: ApiClient, request: bytes) -> tuple[int, bytes]:
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(api.socket_path)
        conn.sendall(request)
        conn.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_socket_is_private(api):
    assert stat.S_IMODE(os.stat(api.socket_path).st_mode) == 0o600


def test_instance_info_has_firecrackers_fields(api):
    info = api.get("/")
    assert info == {"id": "test-vm", "state": "Not started", "vmm_version": info["vmm_version"], "app_name": "pyvmm"}


def test_configuration_round_trips_through_vm_config(api, files):
    assert api.put("/machine-config", {"vcpu_count": 2, "mem_size_mib": 256}) is None
    api.patch("/machine-config", {"mem_size_mib": 512})
    api.put("/boot-source", {"kernel_image_path": files["kernel"], "boot_args": "console=ttyS0"})
    api.put("/drives/root", {"drive_id": "root", "path_on_host": files["disk"], "is_root_device": True,
                             "is_read_only": False})
    api.put("/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "52:54:00:ab:cd:ef"})
    api.put("/vsock", {"guest_cid": 3, "uds_path": "/tmp/v.sock"})
    api.put("/entropy", {})
    api.put("/metrics", {"metrics_path": files["metrics"]})
    config = api.get("/vm/config")
    assert config["machine-config"]["vcpu_count"] == 2 and config["machine-config"]["mem_size_mib"] == 512
    assert config["boot-source"]["boot_args"] == "console=ttyS0"
    assert [d["drive_id"] for d in config["drives"]] == ["root"]
    assert config["network-interfaces"][0]["guest_mac"] == "52:54:00:ab:cd:ef"
    assert config["vsock"] == {"guest_cid": 3, "uds_path": "/tmp/v.sock"}
    assert config["entropy"] == {}
    api.put("/actions", {"action_type": "FlushMetrics"})
    assert json.loads(open(files["metrics"]).readline())["state"] == "Not started"


def test_the_document_validates_as_a_definition_would(api, files):
    api.put("/drives/a", {"drive_id": "a", "path_on_host": files["disk"], "is_root_device": True})
    with pytest.raises(ApiError) as error:
        api.put("/drives/b", {"drive_id": "b", "path_on_host": files["disk"], "is_root_device": True})
    assert error.value.status == 400 and "root device already" in error.value.fault_message


def _valid_bodies(files) -> dict[str, tuple[str, str, dict]]:
    """resource -> (method, path, a valid body) for each resource a route takes."""
    return {
        "MachineConfiguration": ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128}),
        "BootSource": ("PUT", "/boot-source", {"kernel_image_path": files["kernel"]}),
        "Drive": ("PUT", "/drives/d0", {"drive_id": "d0", "is_root_device": False, "path_on_host": files["disk"]}),
        "PartialDrive": ("PATCH", "/drives/d0", {"drive_id": "d0"}),
        "NetworkInterface": ("PUT", "/network-interfaces/n0", {"iface_id": "n0", "host_dev_name": "tap0"}),
        "PartialNetworkInterface": ("PATCH", "/network-interfaces/n0", {"iface_id": "n0"}),
        "Vsock": ("PUT", "/vsock", {"guest_cid": 3, "uds_path": "/tmp/v.sock"}),
        "EntropyDevice": ("PUT", "/entropy", {}),
        "Logger": ("PUT", "/logger", {}),
        "Metrics": ("PUT", "/metrics", {"metrics_path": files["metrics"]}),
        "InstanceActionInfo": ("PUT", "/actions", {"action_type": "FlushMetrics"}),
        "Vm": ("PATCH", "/vm", {"state": "Paused"}),
        "PyvmmAction": ("PUT", "/pyvmm/actions", {"action_type": "Stop"}),
        "PyvmmMigration": ("PUT", "/pyvmm/migration", {"destination": "unix:/nonexistent.sock"}),
        "AgentExec": ("PUT", "/pyvmm/agent/exec", {"argv": ["true"]}),
        "AgentFile": ("PUT", "/pyvmm/agent/files", {"path": "/tmp/f", "content": ""}),
        "SnapshotCreateParams": ("PUT", "/snapshot/create", {"snapshot_path": "/tmp/s", "mem_file_path": "/tmp/m"}),
        "SnapshotLoadParams": ("PUT", "/snapshot/load", {"snapshot_path": "/tmp/s", "mem_file_path": "/tmp/m"}),
        "Balloon": ("PUT", "/balloon", {"amount_mib": 0, "deflate_on_oom": False}),
        "BalloonUpdate": ("PATCH", "/balloon", {"amount_mib": 0}),
        "BalloonStatsUpdate": ("PATCH", "/balloon/statistics", {"stats_polling_interval_s": 1}),
        "PyvmmVcpus": ("PUT", "/pyvmm/vcpus", {"count": 1}),
    }


# Resources sent inside another's body: (the outer resource, where it sits, a valid one).
NESTED = {
    "MemoryBackend": ("SnapshotLoadParams", "mem_backend", {"backend_type": "File", "backend_path": "/tmp/m"}),
    "NetworkOverride": ("SnapshotLoadParams", "network_overrides[0]", {"iface_id": "n0", "host_dev_name": "tap0"}),
    "VsockOverride": ("SnapshotLoadParams", "vsock_override", {"uds_path": "/tmp/v.sock"}),
    "Clone": ("SnapshotLoadParams", "clone", {"name": "c1", "directory": "/tmp"}),
    "RateLimiter": ("Drive", "rate_limiter", {"ops": {"size": 10, "refill_time": 1000}}),
    "TokenBucket": ("RateLimiter", "bandwidth", {"size": 1 << 20, "refill_time": 1000}),
}


def _request(files, resource: str, body: dict) -> tuple[str, str, dict, str]:
    """(method, path, the whole body, the field prefix) sending `body` as `resource`."""
    if resource not in NESTED:
        method, path, _ = _valid_bodies(files)[resource]
        return method, path, body, ""
    outer, where, _ = NESTED[resource]
    outer_body = NESTED[outer][2] if outer in NESTED else _valid_bodies(files)[outer][2]
    outer_body = {k: v for k, v in outer_body.items() if not (where == "mem_backend" and k == "mem_file_path")}
    name = where.split("[")[0]
    method, path, whole, prefix = _request(files, outer, {**outer_body, name: [body] if "[" in where else body})
    return method, path, whole, f"{prefix}{where}."


WRONG_TYPE = {"string": 12345, "integer": "12", "boolean": "yes", "object": 5, "array": "x"}
CASES = [(resource, field) for resource, fields in schema.RESOURCES.items() if resource != "PyvmmOptions"
         for field in fields]


@pytest.mark.parametrize("resource,field", CASES, ids=[f"{r}.{f.name}" for r, f in CASES])
def test_every_field_with_a_bad_value_is_a_400_naming_it(api, files, resource, field):
    body = NESTED[resource][2] if resource in NESTED else _valid_bodies(files)[resource][2]
    api.put("/drives/d0", {"drive_id": "d0", "is_root_device": False, "path_on_host": files["disk"]})
    for bad in (WRONG_TYPE[field.type], *([f"not-{field.enum[0]}"] if field.enum else []),
                *([field.minimum - 1] if field.minimum is not None else []),
                *([field.maximum + 1] if field.maximum is not None else [])):
        method, path, whole, prefix = _request(files, resource, {**body, field.name: bad})
        with pytest.raises(ApiError) as error:
            api.request(method, path, whole)
        assert error.value.status == 400
        assert error.value.fault_message.startswith(prefix + field.name), error.value.fault_message
    if field.required:
        method, path, whole, prefix = _request(files, resource, {k: v for k, v in body.items() if k != field.name})
        with pytest.raises(ApiError) as error:
            api.request(method, path, whole)
        assert error.value.status == 400 and error.value.fault_message == f"{prefix}{field.name} is required"


@pytest.mark.parametrize("method,path", [(r.method, r.path.replace("{drive_id}", "d").replace("{iface_id}", "n"))
                                         for r in ROUTES if r.body])
def test_bodies_that_are_not_objects_or_have_unknown_fields_are_400(api, method, path):
    for body in ([1, 2], "text", 7):
        with pytest.raises(ApiError) as error:
            api.request(method, path, body)
        assert error.value.status == 400
    with pytest.raises(ApiError) as error:
        api.request(method, path, {"no_such_field": 1})
    assert error.value.status == 400
    assert "no_such_field" in error.value.fault_message or "is required" in error.value.fault_message


def test_unknown_path_is_404_and_wrong_method_405_with_allow(api):
    status, body = raw(api, b"GET /no/such/thing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 404 and "fault_message" in json.loads(body)
    data = b"DELETE /machine-config HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(api.socket_path)
        conn.sendall(data)
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 405") and b"Allow: GET, PUT, PATCH" in reply


@pytest.mark.parametrize("method", [b"TRACE", b"CONNECT", b"QUERY"])
def test_methods_no_route_has_are_405_or_404_not_501(api, method):
    status, body = raw(api, method + b" /machine-config HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 405 and "allowed: GET, PUT, PATCH" in json.loads(body)["fault_message"]
    status, body = raw(api, method + b" /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 404


@pytest.mark.parametrize("request_bytes", [
    b"PUT /machine-config HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\n{bad}",
    b"PUT /machine-config HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    b"PUT /machine-config HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\nConnection: close\r\n\r\n",
    b"PUT /machine-config HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nConnection: close\r\n\r\n\xff\xfe{}",
    b"PUT /machine-config HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
    b"GARBAGE\r\n\r\n",
])
def test_malformed_requests_are_400_with_a_fault_message(api, request_bytes):
    status, body = raw(api, request_bytes)
    assert status == 400
    assert json.loads(body)["fault_message"]


def test_state_changes_before_start_are_refused(api):
    for method, path, body in (("PATCH", "/vm", {"state": "Paused"}), ("PUT", "/pyvmm/actions", {"action_type": "Stop"}),
                               ("PUT", "/actions", {"action_type": "SendCtrlAltDel"}), ("GET", "/pyvmm/devices", None)):
        with pytest.raises(ApiError) as error:
            api.request(method, path, body)
        assert error.value.status == 400 and "not been started" in error.value.fault_message


def test_concurrent_requests_all_answer(api):
    errors: list[Exception] = []

    def worker(index: int) -> None:
        try:
            for _ in range(10):
                api.patch("/machine-config", {"vcpu_count": 1 + index})
                assert api.get("/machine-config")["vcpu_count"] in range(1, 9)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_openapi_document_and_routes_are_in_sync(api):
    served = api.get("/openapi.json")
    assert served == json.loads(json.dumps(document()))
    documented = {(method.upper(), path) for path, operations in served["paths"].items() for method in operations}
    implemented = {(route.method, route.path) for route in ROUTES}
    assert documented == implemented
    assert served["openapi"].startswith("3.")
    # every $ref resolves, and every body schema is the validator's field table
    text = json.dumps(served)
    for ref in {part.split('"')[0] for part in text.split('"$ref": "#/components/schemas/')[1:]}:
        assert ref in served["components"]["schemas"], ref
    for name, fields in schema.RESOURCES.items():
        assert set(served["components"]["schemas"][name]["properties"]) == {f.name for f in fields}


def test_console_history_endpoint(api):
    assert api.get("/pyvmm/console") is None  # nothing printed yet: an empty body
    with pytest.raises(ApiError) as error:
        api.get("/pyvmm/console?tail=-1")
    assert error.value.status == 400 and error.value.fault_message.startswith("tail")


def test_migration_resources_before_a_start(api):
    with pytest.raises(ApiError) as error:
        api.put("/pyvmm/migration", {"destination": "ftp:somewhere"})
    assert error.value.status == 400 and error.value.fault_message.startswith("destination")
    for method, path in (("GET", "/pyvmm/migration"), ("PUT", "/pyvmm/migration/cancel")):
        with pytest.raises(ApiError) as error:
            api.request(method, path)
        assert error.value.status == 400
    with pytest.raises(ApiError) as error:
        api.put("/pyvmm/migration", {"destination": "unix:/nonexistent.sock"})
    assert error.value.status == 400 and error.value.fault_message == "the VM has not been started"
