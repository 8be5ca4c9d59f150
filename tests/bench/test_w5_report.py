"""W5's rounds: a system measured in several rounds is reported as one row over all of them."""

from __future__ import annotations

import sys

import pytest
from repo_paths import BENCH

sys.path.insert(0, str(BENCH))  # the scripts import their siblings by bare name, as `python bench/x.py` does
from w5_load import Outcome, Sample  # noqa: E402
from w5_report import Row, merge  # noqa: E402


def test_rounds_merge_into_all_tasks_over_all_the_time() -> None:
    a = Row("pagedq single-item", Outcome(2.0, [Sample(0.1)] * 100, ["boom"], {"bulk call": 0.5}), 32, 4.0, 1000,
            {"worker": 0.4, "redis": 0.1})
    b = Row("pagedq single-item", Outcome(1.0, [Sample(0.3)] * 300, [], {"bulk call": 0.25}), 32, 8.0, 3000,
            {"worker": 0.6, "redis": 0.3})
    row = merge([a, b])
    assert (row.tasks, row.outcome.seconds, row.tasks_per_s) == (400, 3.0, pytest.approx(400 / 3))
    assert row.outcome.failures == ["boom"] and row.outcome.extra == {"bulk call": 0.75}
    assert row.batch == pytest.approx((4 * 100 + 8 * 300) / 400) and row.redis_calls == 4000
    assert row.cpu_s == pytest.approx({"worker": 1.0, "redis": 0.4}) and row.latency_ms(50) == pytest.approx(300)
    assert merge([a, Row("x", Outcome(1.0, []), redis_calls=None)]).redis_calls is None  # unknown stays unknown
