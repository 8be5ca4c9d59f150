"""W5's rounds: a system measured in several rounds is reported as one row over all of them."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from repo_paths import BENCH

sys.path.insert(0, str(BENCH))  # the scripts import their siblings by bare name, as `python bench/x.py` does
from w5_load import Outcome, Sample, closed_loop, steady_window  # noqa: E402
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


def test_steady_state_is_between_the_first_and_the_last_clients_completions() -> None:
    # 3 clients, 10 completions at t = 0..9: the burst's first 3 and the last 3 (fewer clients busy) are out
    assert steady_window([float(t) for t in reversed(range(10))], clients=3) == (4, 4.0)
    assert steady_window([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], clients=3) is None  # < 3 x clients
    assert steady_window([1.0] * 9, clients=3) is None  # no time between its ends


def test_a_closed_loop_measures_its_steady_state_and_the_targets_use_it() -> None:
    @contextmanager
    def connect() -> Iterator[Callable[[int], int]]:
        yield lambda item: item if item % 7 else int("failure")  # every 7th item fails: it frees its client too

    outcome = closed_loop(connect, list(range(1, 41)), clients=4)
    assert len(outcome.samples) == 35 and len(outcome.failures) == 5
    assert outcome.steady is not None and outcome.steady[0] == 40 - 2 * 4 and outcome.steady[1] > 0
    row = Row("x", Outcome(4.0, [Sample(0.1)] * 100, steady=(50, 1.0)), 4)
    assert (row.tasks_per_s, row.rate) == (25.0, 50.0)  # the whole run, and the steady state
    assert Row("bulk", Outcome(4.0, [Sample(0.1)] * 100)).rate == 25.0  # no steady state: the whole run


def test_rounds_merge_their_steady_states_only_if_every_round_has_one() -> None:
    a = Row("s", Outcome(2.0, [Sample(0.1)] * 100, steady=(60, 1.0)), 32)
    b = Row("s", Outcome(3.0, [Sample(0.1)] * 200, steady=(140, 1.5)), 32)
    assert merge([a, b]).outcome.steady == (200, 2.5) and merge([a, b]).rate == pytest.approx(80.0)
    short = Row("s", Outcome(1.0, [Sample(0.1)] * 50), 32)
    assert merge([a, short]).outcome.steady is None and merge([a, short]).rate == pytest.approx(150 / 3)
