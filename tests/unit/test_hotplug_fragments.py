"""Definition fragments for attach-device / detach-device (manage/hotplug_client.py): what each
names, how the definition changes (--config), and the one-line refusals."""

import pytest

from pyvmm.errors import UserError
from pyvmm.manage.hotplug_client import _add, _api_path, _items, _remove


def test_a_fragment_names_drives_nics_and_the_vsock_and_entropy_devices():
    fragment = {"drives": [{"drive_id": "d", "path_on_host": "/x"}], "network-interfaces": [{"iface_id": "n"}],
                "vsock": {"guest_cid": 3, "uds_path": "/v"}, "entropy": {}}
    items = _items(fragment)
    assert [(section, device_id) for section, device_id, _ in items] == [
        ("drives", "d"), ("network-interfaces", "n"), ("vsock", "vsock"), ("entropy", "entropy")]
    assert [_api_path(section, device_id) for section, device_id, _ in items] == [
        "/drives/d", "/network-interfaces/n", "/vsock", "/entropy"]
    document: dict = {}
    _add(document, items)
    assert document["vsock"] == {"guest_cid": 3, "uds_path": "/v"} and document["entropy"] == {}
    _remove(document, _items(fragment, ids_only=True))
    assert document == {"drives": [], "network-interfaces": []}


@pytest.mark.parametrize("fragment, message", [
    ({"balloon": {"amount_mib": 1}}, r"^balloon: the balloon cannot be attached or detached \(fixed when"),
    ({"console_ports": [{"name": "x"}]}, r"^console_ports: console ports cannot be attached"),
    ({"machine-config": {}}, r"^machine-config: only drives, network-interfaces, vsock and entropy"),
    ({"vsock": []}, r"^vsock must be a table$"),
    ({}, r"^the fragment names no drive, network interface, vsock or entropy device$"),
    ([], r"^a device fragment is a table"),
])
def test_fragments_that_cannot_be_plugged_are_refused_in_one_line(fragment, message):
    with pytest.raises(UserError, match=message):
        _items(fragment)


def test_the_definition_keeps_one_of_each_and_says_which_is_missing():
    document = {"entropy": {}}
    with pytest.raises(UserError, match=r"^the definition has an entropy device already \(one per VM\)$"):
        _add(document, _items({"entropy": {}}))
    with pytest.raises(UserError, match=r"^the definition has no vsock device$"):
        _remove(document, _items({"vsock": {}}, ids_only=True))
