"""How many torch intra-op threads a model's next step runs with: a fixed count, or measured (`AUTO`).

A step's matrix products are split over the intra-op threads (OpenMP), and every split waits for its slowest
thread. On a worker whose cores also run the queue (Celery's consumer, the task threads, Redis, clients), a
thread that another process has descheduled makes the whole step wait: measured on 2 shared vCPUs with the
demo classifier, one thread served a 2,000-text bulk 24% faster than torch's two, while the single-item loop's
small steps ran 12% slower on one (README, W5). Which count wins depends on the model, the step's size and the
machine's load, so `AUTO` measures it, per model, per step size -- but only where a step's wall time per token
is what the count should minimise:

    saturated  after a step that could not have taken more -- it ran at the request cap or left requests
               waiting (`ModelExecutor.saturated`) -- the engine is what limits the service: the next step
               takes the fewest threads within `MARGIN` of the fastest. After any other step the engine is
               not: the queue's work around it (consumer, claims, writes, Redis, clients) is, on the same
               cores, and a thread that spins in a step takes a core from it -- more threads only where
               they are `BELOW_CAP_MARGIN` (1.3x) faster per token. Measured with the engine-core process
               (W5's single-item loop, demo classifier, 2 vCPUs, paired A/B of 8 x 667 tasks): with 1.5x
               1.09x tasks/s (8 of 8 faster), the worker's CPU per task 1,859 -> 1,657 us, against the
               default count below the cap (what this did before, when the engine shared the Celery
               process's GIL and the default had served that loop 12% better); 1.3x ran as 1.5x (0.99x, 10
               pairs) and keeps two threads for a DistilBERT-sized classifier's single requests on an idle
               machine (measured there 1.36-1.62x faster per token than one; 5%: 1.04x slower than 1.3x)

    bucket     a step's size class: the bit length of the tokens it will compute where its executor knows
               them before the step (`ModelExecutor.planned_tokens`: the classifier's requests are tokenized
               before they are stepped), else of the tokens the model's previous step computed (steps come in
               runs -- a bulk's full steps, a closed loop's small ones -- so the last step predicts the next;
               but not a run's first: a bulk's first step after a closed loop's small ones ran with the count
               the small ones wanted, two threads, 28-44 ms where one ran it in ~25 on W5's 2 vCPUs)
    options    1, 2, 4, .. up to the engine's default (one per core, or OMP_NUM_THREADS)
    estimate   per (bucket, option): wall seconds per computed token, the lowest of its first `WARMUP`
               measurements (a first measurement can be a cold outlier, which a moving average would keep for
               hundreds of steps of an option measured only in exploring runs), then a moving average.
               Known bias (README, W5, nineteenth session): a step's cost per token also holds work that
               varies within a run (in-process, a run's first steps tokenize the next texts: 2-3x per token),
               and a count measured mostly there looks slower than it runs: in-process on the demo classifier
               the incumbent count kept winning whichever it was (end to end both counts ran alike there)
    choice     the default count until a step has computed tokens; then each option is measured `WARMUP`
               times in a bucket first; then the fewest threads whose estimate is within the margin
               (`MARGIN`, or `BELOW_CAP_MARGIN`) of the best (a thread must pay for itself: the cores it
               would spin on serve the queue); every `EXPLORE_EVERY`-th step of a bucket starts a run of
               `EXPLORE_RUN` steps on the option measured longest ago (every `FAR_FACTOR` times that while
               the others are `FAR` or more slower), so that the estimates follow the machine's load
    switches   a step that runs with another count than the step before it is not measured: OpenMP's
               threads that were asleep wake up in it (measured: such a step cost 2-3x the next ones)

Results do not depend on the count beyond floating-point order (a split of a product sums in another order),
which the engine's tolerance against transformers already covers. A model whose executor reports no computed
tokens (`ModelExecutor.work_done` stays 0) keeps the default count.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

AUTO = "auto"
WARMUP = 2  # measurements of each option in a bucket before the estimates decide
EXPLORE_EVERY = 64  # every this-many steps of a bucket, a run of steps re-measures another option
EXPLORE_RUN = 3  # steps in such a run (the first is not measured: see "switches")
FAR, FAR_FACTOR = 1.5, 4  # options this much slower than the best are re-measured this many times less often
MARGIN = 0.05  # more threads only where they are at least this much faster per token (saturated steps)
BELOW_CAP_MARGIN = 0.3  # the same after a step below the request cap (see the module docstring)
ALPHA = 0.25  # weight of a new measurement in an estimate
MAX_BUCKET = 24  # steps of 2**23 tokens and more share a bucket


def _explore_every(estimates: dict[int, _Estimate]) -> int:
    """`EXPLORE_EVERY`, times `FAR_FACTOR` while every other option is `FAR` or more slower than the best:
    re-measuring an option twice as slow costs a run of slow steps, and the load rarely moves it that far."""
    values = sorted(e.seconds_per_token for e in estimates.values())
    far = len(values) > 1 and values[1] >= FAR * values[0]
    return EXPLORE_EVERY * FAR_FACTOR if far else EXPLORE_EVERY


def size_class(tokens: int) -> int:
    """A step's bucket (module docstring): the bit length of its computed tokens, capped at `MAX_BUCKET`."""
    return min(tokens.bit_length(), MAX_BUCKET)


def options(most: int) -> tuple[int, ...]:
    """1, 2, 4, .. below `most`, then `most`."""
    counts, n = [], 1
    while n < most:
        counts.append(n)
        n *= 2
    return (*counts, max(most, 1))


@dataclass
class _Estimate:
    seconds_per_token: float = 0.0
    samples: int = 0
    measured_at: int = -1  # the bucket's step count at its last measurement


@dataclass
class StepThreads:
    """One model's intra-op threads: `choose()` before a step, `record(...)` after it."""

    setting: int | str | None  # a count, AUTO, or None (the default count)
    default: int  # the engine's default count
    #: bucket -> option -> estimate
    _table: dict[int, dict[int, _Estimate]] = field(default_factory=dict, init=False)
    _steps: dict[int, int] = field(default_factory=dict, init=False)  # bucket -> steps recorded
    _bucket: int = field(default=0, init=False)  # the previous step's bucket
    _run_left: int = field(default=0, init=False)  # steps left in an exploring run
    _previous: int = field(default=0, init=False)  # the count of the step before the latest one
    last: int = field(default=0, init=False)  # the count of the latest step (0: none yet)
    saturated: bool = field(default=False, init=False)  # the latest step ran at its cap or left requests waiting

    def __post_init__(self) -> None:
        fixed = self.setting if isinstance(self.setting, int) else self.default
        self.options = options(self.default) if self.auto else (fixed,)

    @property
    def auto(self) -> bool:
        return self.setting == AUTO and self.default > 1

    def step(self, run: Callable[[], None], work_done: Callable[[], int], saturated: Callable[[], bool],
             cap: int | None = None, planned: int | None = None) -> None:
        """Run one step (`run`) in the calling thread with the count `choose(cap, planned)` gives (set only where
        the thread runs with another: OpenMP's count is per thread, and reading it costs 0.03 us), and `record`
        it with the tokens `work_done()` advanced by and whether it was `saturated()`."""
        wanted = self.choose(cap, planned)
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)
        if not self.auto:
            run()
            return
        work, start = work_done(), time.perf_counter()
        run()
        self.record(wanted, time.perf_counter() - start, work_done() - work, saturated())

    def choose(self, cap: int | None = None, planned: int | None = None) -> int:
        """The count for the next step, which will compute `planned` tokens (None: unknown, as many as the
        previous step); at most `cap` (the engine's share of the cores while other models' steps run at the
        same time: `service.CoreShare`) unless the setting is a fixed count."""
        if cap is not None and not isinstance(self.setting, int):
            self.last = min(self._choose(planned), max(cap, 1))
        else:
            self.last = self._choose(planned)
        return self.last

    def _choose(self, planned: int | None = None) -> int:
        if not self.auto:
            return self.options[0]
        self._previous = self.last
        if not self._steps:  # nothing measured yet (no step computed a token): the default count
            return self.default
        if self._run_left > 0:
            self._run_left -= 1
            return self.last
        bucket = self._bucket if not planned or planned <= 0 else size_class(planned)
        estimates = self._table.setdefault(bucket, {n: _Estimate() for n in self.options})
        steps = self._steps.get(bucket, 0)
        untried = [n for n in self.options if estimates[n].samples < WARMUP]
        if untried:
            return untried[0]
        if steps % (every := _explore_every(estimates)) == every - 1:
            self._run_left = EXPLORE_RUN - 1
            return min(self.options, key=lambda n: estimates[n].measured_at)
        best = min(estimates[n].seconds_per_token for n in self.options)
        margin = MARGIN if self.saturated else BELOW_CAP_MARGIN
        return next(n for n in self.options if estimates[n].seconds_per_token <= best * (1 + margin))

    def record(self, threads: int, seconds: float, tokens: int, saturated: bool) -> None:
        """What a step run with `threads` took for `tokens` computed tokens, and whether it was `saturated`
        (nothing is learned from a step that computed none)."""
        self.saturated = saturated
        if not self.auto or tokens <= 0 or threads not in self.options:
            return
        bucket = size_class(tokens)
        estimates = self._table.setdefault(bucket, {n: _Estimate() for n in self.options})
        steps = self._steps[bucket] = self._steps.get(bucket, 0) + 1
        self._bucket = bucket
        if threads != self._previous:  # OpenMP's threads woke up in this step: not what the count costs
            return
        estimate, value = estimates[threads], seconds / tokens
        if estimate.samples == 0:
            estimate.seconds_per_token = value
        elif estimate.samples < WARMUP:  # the faster: a first step may pay one-time costs (see the module)
            estimate.seconds_per_token = min(estimate.seconds_per_token, value)
        else:
            estimate.seconds_per_token = (1 - ALPHA) * estimate.seconds_per_token + ALPHA * value
        estimate.samples += 1
        estimate.measured_at = steps

    def table(self) -> dict[str, dict[str, float]]:
        """The estimates, for stats: bucket's upper bound in tokens -> threads -> microseconds per token."""
        return {str(2**bucket - 1): {str(n): round(e.seconds_per_token * 1e6, 3) for n, e in estimates.items()
                                     if e.samples}
                for bucket, estimates in sorted(self._table.items()) if any(e.samples for e in estimates.values())}
