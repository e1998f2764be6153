"""The balloon and memory options from the command line and definitions, without a VM:
pyvmm run's --balloon syntax, pyvmm create's options becoming a definition, field names in
errors."""

from __future__ import annotations

import pytest

from pyvmm.api.schema import VmSpec
from pyvmm.cli import build_parser, cli_name
from pyvmm.config import BalloonConfig, ConfigError, MachineConfig
from pyvmm.errors import UserError
from pyvmm.manage.cli import create_document


def test_run_balloon_options_parse_and_bad_ones_name_their_key():
    assert BalloonConfig.parse("") == BalloonConfig()
    assert BalloonConfig.parse("amount=64,deflate-on-oom,free-page-reporting,stats=5,transport=mmio") == \
        BalloonConfig(64, True, 5, True, "mmio")
    for text, field in (("amount=x", "balloon.amount"), ("stats=70000", "balloon.stats_interval_s"),
                        ("amount=-1", "balloon.amount_mib"), ("nonsense", "balloon"), ("transport=usb", "balloon.transport")):
        with pytest.raises(ConfigError) as bad:
            BalloonConfig.parse(text)
        assert bad.value.field == field, (text, bad.value.field)
    assert cli_name("balloon.amount_mib") == "--balloon amount"
    with pytest.raises(ConfigError, match="more than the guest's 256 MiB") as above:
        MachineConfig(balloon=BalloonConfig(amount_mib=300)).validate()
    assert above.value.field == "balloon.amount_mib"


def test_create_options_become_a_definition_the_schema_accepts():
    args = build_parser().parse_args(["create", "m", "--balloon", "amount=16,free-page-reporting,stats=2", "--ksm",
                                      "--huge-pages", "transparent"])
    document = create_document(args)
    machine, _ = VmSpec.from_document(document).machine_config()
    assert machine.balloon == BalloonConfig(16, False, 2, True) and machine.ksm and machine.huge_pages == "transparent"
    with pytest.raises(UserError, match="--balloon amount 'abc' is not a number"):
        create_document(build_parser().parse_args(["create", "m", "--balloon", "amount=abc"]))


def test_definition_balloon_section_errors_name_firecrackers_fields():
    with pytest.raises(ConfigError) as bad:
        VmSpec.from_document({"machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
                              "balloon": {"amount_mib": 200, "deflate_on_oom": False}})
    assert str(bad.value).startswith("balloon.amount_mib 200 MiB is more than the guest's 128 MiB")
    with pytest.raises(ConfigError, match="balloon.free_page_hinting True is not supported"):
        VmSpec.from_document({"balloon": {"amount_mib": 0, "deflate_on_oom": False, "free_page_hinting": True}})
