"""`StepThreads`: the intra-op threads of a model's next step, fixed or measured per step size ("auto")."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pagedq.worker.engine.threads import (
    AUTO,
    EXPLORE_EVERY,
    EXPLORE_RUN,
    FAR_FACTOR,
    WARMUP,
    StepThreads,
    options,
)


def run(threads: StepThreads, steps: int, tokens: Callable[[int], int],
        cost: Callable[[int, int], float], saturated: Callable[[int], bool] = lambda i: True) -> list[int]:
    """Drive `steps` steps: step i computes `tokens(i)` tokens in `cost(threads, tokens)` seconds per token and
    is `saturated(i)` (by default always: at its cap, or leaving requests for later). Returns the count each
    step ran with."""
    chosen = []
    for i in range(steps):
        n = threads.choose()
        chosen.append(n)
        t = tokens(i)
        threads.record(n, cost(n, t) * t, t, saturated(i))
    return chosen


def test_options_are_powers_of_two_up_to_the_default() -> None:
    assert options(1) == (1,)
    assert options(2) == (1, 2)
    assert options(6) == (1, 2, 4, 6)
    assert options(8) == (1, 2, 4, 8)


@pytest.mark.parametrize(("setting", "expected"), [(None, 4), (3, 3), (1, 1)])
def test_a_fixed_setting_or_none_never_changes_the_count(setting: int | None, expected: int) -> None:
    threads = StepThreads(setting, default=4)
    assert not threads.auto
    chosen = run(threads, 300, lambda i: 100, lambda n, t: 1e-6 if n == 1 else 1e-3)  # 1 would be faster
    assert set(chosen) == {expected}
    assert threads.table() == {}


def test_auto_on_one_core_is_one_thread() -> None:
    threads = StepThreads(AUTO, default=1)
    assert not threads.auto and set(run(threads, 10, lambda i: 100, lambda n, t: 1e-6)) == {1}


def test_auto_settles_on_the_fastest_count_and_keeps_measuring_the_others() -> None:
    threads = StepThreads(AUTO, default=4)
    cost = {1: 40e-6, 2: 20e-6, 4: 10e-6}  # seconds per token: 4 threads are the fastest
    chosen = run(threads, 20 * EXPLORE_EVERY, lambda i: 500, lambda n, t: cost[n])
    settled = chosen[-EXPLORE_EVERY * 10:]
    assert settled.count(4) > 0.85 * len(settled)
    assert {1, 2} <= set(settled)  # re-measured now and then, in runs
    starts = [i for i in range(1, len(settled) - EXPLORE_RUN) if settled[i] != 4 and settled[i - 1] == 4]
    assert starts and all(settled[i:i + EXPLORE_RUN] == [settled[i]] * EXPLORE_RUN for i in starts)
    table = threads.table()["511"]  # 500 tokens: the bucket up to 511
    assert table == {"1": pytest.approx(40.0), "2": pytest.approx(20.0), "4": pytest.approx(10.0)}


def test_more_threads_must_be_faster_by_the_margin() -> None:
    threads = StepThreads(AUTO, default=2)
    chosen = run(threads, 10 * EXPLORE_EVERY, lambda i: 300, lambda n, t: 10e-6 if n == 1 else 9.8e-6)
    assert chosen[-EXPLORE_EVERY:].count(1) >= EXPLORE_EVERY - EXPLORE_RUN  # 2% faster does not pay for a thread


def test_the_count_follows_the_step_size_and_a_change_of_load() -> None:
    threads = StepThreads(AUTO, default=2)

    def small_fast_on_two(n: int, t: int) -> float:  # small steps: 2 threads faster; large ones: 1
        return (5e-6 if n == 2 else 10e-6) if t < 256 else (5e-6 if n == 1 else 10e-6)

    tokens = lambda i: 100 if (i // 50) % 2 == 0 else 2000  # noqa: E731 - runs of small and large steps
    chosen = run(threads, 40 * 50, tokens, small_fast_on_two)
    late = range(30 * 50, 40 * 50)
    # the first step of a run is chosen from the previous run's size; the rest from their own
    small = [chosen[i] for i in late if tokens(i) == 100 and tokens(i - 1) == 100]
    large = [chosen[i] for i in late if tokens(i) == 2000 and tokens(i - 1) == 2000]
    assert small.count(2) > 0.9 * len(small) and large.count(1) > 0.9 * len(large)
    # the load changes: now one thread is the faster at every size; the estimates follow within a few runs
    chosen = run(threads, 12 * EXPLORE_EVERY, lambda i: 100, lambda n, t: 5e-6 if n == 1 else 20e-6)
    assert chosen[-EXPLORE_EVERY:].count(1) >= EXPLORE_EVERY - EXPLORE_RUN


def test_a_step_after_a_switch_is_not_measured() -> None:
    """A switch's step pays for waking OpenMP's threads: were it measured, two threads here would look slow."""
    threads = StepThreads(AUTO, default=2)
    previous = [0]

    def cost(n: int, t: int) -> float:
        woke = n != previous[0]
        previous[0] = n
        return 100e-6 if woke else (5e-6 if n == 2 else 10e-6)

    chosen = run(threads, 8 * EXPLORE_EVERY, lambda i: 300, cost)
    assert chosen[-EXPLORE_EVERY:].count(2) >= EXPLORE_EVERY - EXPLORE_RUN
    assert threads.table()["511"] == {"1": pytest.approx(10.0), "2": pytest.approx(5.0)}


def test_steps_that_compute_nothing_teach_nothing() -> None:
    threads = StepThreads(AUTO, default=2)
    for _ in range(10):
        threads.record(threads.choose(), 1.0, 0, True)
    assert threads.table() == {}
    assert WARMUP >= 1


@pytest.mark.parametrize(("slower", "every"), [(1.2, EXPLORE_EVERY), (2.0, EXPLORE_EVERY * FAR_FACTOR)])
def test_a_far_slower_option_is_re_measured_less_often(slower: float, every: int) -> None:
    threads = StepThreads(AUTO, default=2)
    steps = 40 * EXPLORE_EVERY * FAR_FACTOR
    chosen = run(threads, steps, lambda i: 300, lambda n, t: 10e-6 * (slower if n == 2 else 1.0))
    late = chosen[steps // 2:]
    runs = sum(1 for i in range(1, len(late)) if late[i] == 2 and late[i - 1] == 1)
    assert runs == pytest.approx(len(late) / every, rel=0.2)


def test_below_its_cap_a_step_takes_more_threads_only_where_they_are_much_faster() -> None:
    """At the cap (saturated) the engine limits the service: the fewest threads within 5% of the fastest. Below
    it the queue's work on the same cores does: more threads only where at least 1.3x faster per token."""
    one_faster = lambda n, t: 5e-6 if n == 1 else 10e-6  # noqa: E731
    two_a_bit_faster = lambda n, t: 10e-6 if n == 1 else 8.4e-6  # noqa: E731  (1.19x)
    two_much_faster = lambda n, t: 10e-6 if n == 1 else 5e-6  # noqa: E731  (2x)
    late = slice(-EXPLORE_EVERY, None)
    for saturated in (True, False):
        full = lambda i, s=saturated: s  # noqa: E731
        chosen = run(StepThreads(AUTO, default=2), 4 * EXPLORE_EVERY, lambda i: 300, one_faster, full)
        assert chosen[late].count(1) >= EXPLORE_EVERY - EXPLORE_RUN, saturated
        chosen = run(StepThreads(AUTO, default=2), 4 * EXPLORE_EVERY, lambda i: 300, two_much_faster, full)
        assert chosen[late].count(2) >= EXPLORE_EVERY - EXPLORE_RUN, saturated
    at_cap = run(StepThreads(AUTO, default=2), 4 * EXPLORE_EVERY, lambda i: 300, two_a_bit_faster)
    assert at_cap[late].count(2) >= EXPLORE_EVERY - EXPLORE_RUN
    below = run(StepThreads(AUTO, default=2), 4 * EXPLORE_EVERY, lambda i: 300, two_a_bit_faster, lambda i: False)
    assert below[late].count(1) >= EXPLORE_EVERY - EXPLORE_RUN
    # a closed loop's small steps and a bulk's full ones alternate: each by its own margin
    threads = StepThreads(AUTO, default=2)
    mixed = run(threads, 40 * 20, lambda i: 300, two_a_bit_faster, saturated=lambda i: (i // 20) % 2 == 1)
    bulk = [n for i, n in enumerate(mixed[400:], 400) if (i // 20) % 2 and i % 20 > 0]
    loop = [n for i, n in enumerate(mixed[400:], 400) if not (i // 20) % 2 and i % 20 > 0]
    assert bulk.count(2) >= 0.85 * len(bulk)
    assert loop.count(1) >= 0.85 * len(loop)
    assert threads.saturated


def test_the_first_step_runs_with_the_default_count() -> None:
    """Nothing measured yet (no step computed a token): the default count, at the cap or below it."""
    for saturated in (True, False):
        threads = StepThreads(AUTO, default=2)
        threads.record(1, 0.0, 0, saturated)  # a step that computed nothing teaches nothing
        assert threads.choose() == 2


def test_a_fixed_setting_ignores_saturation() -> None:
    threads = StepThreads(1, default=2)
    assert set(run(threads, 20, lambda i: 300, lambda n, t: 1e-6, saturated=lambda i: i % 2 == 0)) == {1}


def test_a_cold_first_measurement_does_not_stick() -> None:
    """A model's first step at a size pays one-time costs: the warm-up keeps each count's faster measurement, so
    a cold first step does not make the faster count look slow (and, far slower, re-measured rarely)."""
    threads = StepThreads(AUTO, default=2)
    seen = {1: 0, 2: 0}

    def cost(n: int, t: int) -> float:
        seen[n] += 1
        # each count's first two steps cost 10-20x: the first after a switch is not measured, the second is
        return 100e-6 if seen[n] <= 2 else (5e-6 if n == 2 else 10e-6)

    chosen = run(threads, 2 * EXPLORE_EVERY, lambda i: 300, cost)
    # the first step on the default count (nothing measured yet), then the warm-up: each count's first step
    # after a switch is not measured
    assert chosen[:7] == [2, 1, 1, 1, 2, 2, 2]
    assert chosen[-EXPLORE_EVERY:].count(2) >= EXPLORE_EVERY - EXPLORE_RUN
    assert threads.table()["511"] == {"1": pytest.approx(10.0), "2": pytest.approx(5.0)}


def test_a_cap_bounds_the_count_and_the_estimates_resume_once_it_lifts() -> None:
    """While other models step side by side (`CoreShare`), a cap bounds the count -- "auto" or the default
    alike, a fixed count not -- and what capped steps measured stays valid once the cap lifts."""
    threads = StepThreads(AUTO, 4)
    two_faster = lambda n, t: {1: 4e-6, 2: 1e-6, 4: 2e-6}[n]  # noqa: E731
    capped = []
    for _ in range(20):
        n = threads.choose(cap=1)
        capped.append(n)
        threads.record(n, two_faster(n, 300) * 300, 300, True)
    assert capped == [1] * 20  # untried options are not tried above the cap
    assert run(threads, 60, lambda i: 300, two_faster)[-10:].count(2) >= 10 - EXPLORE_RUN  # then measured, chosen
    assert threads.choose(cap=3) <= 3
    assert StepThreads(None, 4).choose(cap=2) == 2  # the default count is capped too
    assert StepThreads(3, 4).choose(cap=1) == 3  # a count the registry fixes is kept as set


def test_a_step_whose_size_is_known_is_chosen_by_it_not_by_the_step_before() -> None:
    threads = StepThreads(AUTO, default=2)

    def small_fast_on_two(n: int, t: int) -> float:
        return (5e-6 if n == 2 else 10e-6) if t < 256 else (5e-6 if n == 1 else 10e-6)

    tokens = lambda i: 100 if (i // 20) % 2 == 0 else 2000  # noqa: E731 - runs of small and large steps
    run(threads, 400, tokens, small_fast_on_two)  # both sizes measured with both counts
    run(threads, 20, lambda i: 100, small_fast_on_two)  # a run of small steps: they take two threads
    assert threads.choose() == 2  # by the previous step's size, a large step would get two as well
    assert threads.choose(planned=2000) == 1  # told its size, it gets the large steps' count
    assert threads.choose(planned=100) == 2 and threads.choose(planned=0) == 2  # 0: unknown
