"""Numbers typed by a user are ASCII digits: a Unicode digit such as '³' passes str.isdigit()
but not int(), so each parser must refuse it with its own one-line error, not a ValueError."""

from __future__ import annotations

import argparse

import pytest

from pyvmm.config import parse_numa_node
from pyvmm.errors import UserError
from pyvmm.manage.cli import create_document
from pyvmm.manage.mem_cli import parse_length
from pyvmm.migration.channel import parse_address
from pyvmm.ui.cli import parse_listen


def _create_args(**overrides) -> argparse.Namespace:
    values = dict(cpus=1, memory=256, kernel=None, initrd=None, append=None, kernel_args=None, root_disk=None,
                  disk=[], net=[], vsock=None, rng=False, accel=None)
    values.update(overrides)
    return argparse.Namespace(**values)


@pytest.mark.parametrize("parse", [
    lambda: parse_numa_node("cpus=0,mem=128M,distances=10:2³"),
    lambda: parse_numa_node("cpus=0,mem=128M,host_node=³"),
    lambda: parse_numa_node("cpus=³,mem=128M"),
    lambda: parse_length("³K"),
    lambda: parse_address("tcp:localhost:4³"),
    lambda: parse_listen("127.0.0.1:8³", None),
    lambda: create_document(_create_args(vsock="³,/tmp/v.sock")),
], ids=["numa-distances", "numa-host-node", "numa-cpus", "mem-read-length", "migration-port", "ui-listen",
        "create-vsock-cid"])
def test_a_unicode_digit_is_refused_in_one_line(parse):
    with pytest.raises(UserError) as refused:
        parse()
    assert "\n" not in str(refused.value)
