"""When pre-copy stops iterating: migration.source.next_step."""

from pyvmm.migration.source import SETTLED_MS, next_step

LIMIT = 300.0


def test_a_round_within_the_limit_that_is_still_shrinking_is_followed_by_another():
    # 40 ms fits 300 ms, but the last round left 5000 pages and this one 1000: one more round
    assert next_step(1000, 5000, 40.0, LIMIT, round=2, max_rounds=30) == "again"
    # right after the first pass there is no earlier round: another round is tried
    assert next_step(1000, None, 40.0, LIMIT, round=1, max_rounds=30) == "again"


def test_a_round_within_the_limit_that_no_longer_shrinks_or_is_tiny_is_the_last():
    assert next_step(1000, 1100, 40.0, LIMIT, round=3, max_rounds=30) == "final"      # the guest rewrites the same pages
    assert next_step(10, 5000, SETTLED_MS / 2, LIMIT, round=2, max_rounds=30) == "final"
    assert next_step(1000, 5000, 40.0, LIMIT, round=31, max_rounds=30) == "final"     # out of rounds, but it fits


def test_beyond_the_limit_it_goes_on_until_the_rounds_run_out():
    assert next_step(90000, 1000, 900.0, LIMIT, round=5, max_rounds=30) == "again"
    assert next_step(90000, 1000, 900.0, LIMIT, round=31, max_rounds=30) == "fail"
