"""Split points: predicted latencies checked against hand arithmetic, the choice under fast and slow
links and long queues, and the passive link estimator on synthetic traffic."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from types import SimpleNamespace
from typing import cast

import numpy as np
import pytest

from ectrans.client import AsyncClient
from ectrans.common.cost import CostModel
from ectrans.split import client as split_client
from ectrans.split.choose import Link, SplitCosts, choose_split, predict_ms, queue_wait_ms, server_unit_ms
from ectrans.split.client import Drift, SplitClient
from ectrans.split.link import LinkEstimator
from ectrans.split.local import LocalModel

# An encoder of K = 5 units: tokenize, embed, layer0, layer1, head. Tokenizing shrinks 4 kB of text to
# 1 kB of token ids; embedding blows it up to 200 kB of hidden states. The client is 20× slower at layers.
PROFILE = SplitCosts(
    client_ms=(1.0, 2.0, 40.0, 40.0, 1.0),  # prefix sums k=0..5: 0, 1, 3, 43, 83, 84
    server_ms=(0.5, 0.5, 2.0, 2.0, 1.0),  # suffix sums k=0..4: 6, 5.5, 5, 3, 1
    transfer_bytes=(4_000, 1_000, 200_000, 200_000, 200_000),
    result_bytes=1_000,  # bytes crossing at k=0..4: 5 000, 2 000, 201 000, 201 000, 201 000
)
RTT_MS = 5.0

# Transfer ms = 8000 · bytes / bandwidth; each row: client prefix + rtt + transfer + queue + server suffix.
EXPECTED = [
    pytest.param(
        100e6,  # transfer 8e-5 ms/byte: 0.4, 0.16, 16.08 ×3
        0.0,
        [0 + 5 + 0.4 + 6, 1 + 5 + 0.16 + 5.5, 3 + 5 + 16.08 + 5, 43 + 5 + 16.08 + 3, 83 + 5 + 16.08 + 1, 84],
        0,  # fast link, fast server: send the text (11.4 beats 11.66 for token ids)
        id="fast-link-sends-text",
    ),
    pytest.param(
        1e6,  # transfer 8e-3 ms/byte: 40, 16, 1608 ×3
        0.0,
        [0 + 5 + 40 + 6, 1 + 5 + 16 + 5.5, 3 + 5 + 1608 + 5, 43 + 5 + 1608 + 3, 83 + 5 + 1608 + 1, 84],
        1,  # tokenizing locally saves 24 ms of transfer for 1 ms of work: 27.5 beats 51 and 84
        id="medium-link-sends-token-ids",
    ),
    pytest.param(
        100e3,  # transfer 0.08 ms/byte: 400, 160, 16 080 ×3
        0.0,
        [0 + 5 + 400 + 6, 1 + 5 + 160 + 5.5, 3 + 5 + 16080 + 5, 43 + 5 + 16080 + 3, 83 + 5 + 16080 + 1, 84],
        5,  # slow link: even token ids take 160 ms, more than the whole model locally (84)
        id="slow-link-runs-locally",
    ),
    pytest.param(
        100e6,
        100.0,  # the fast-link row plus 100 ms of queue at every k < K
        [111.4, 111.66, 129.08, 167.08, 205.08, 84],
        5,  # a long server queue: local (84) beats the best remote split (111.4)
        id="long-queue-runs-locally",
    ),
]


@pytest.mark.parametrize(("bandwidth_bps", "queue_ms", "expected_ms", "best"), EXPECTED)
def test_predictions_match_hand_arithmetic_and_the_best_is_chosen(
    bandwidth_bps: float, queue_ms: float, expected_ms: list[float], best: int
) -> None:
    link = Link(bandwidth_bps, RTT_MS)
    assert predict_ms(PROFILE, link, queue_ms) == pytest.approx(expected_ms)
    assert choose_split(PROFILE, link, queue_ms) == best


def test_interior_split_after_a_unit_that_shrinks_the_activation() -> None:
    # Units: embed (2 kB of text in, 64 kB out), pool (down to 1 kB), a costly classifier head; result 100 bytes.
    costs = SplitCosts(
        client_ms=(2.0, 1.0, 20.0), server_ms=(0.5, 0.5, 0.5), transfer_bytes=(2_000, 64_000, 1_000), result_bytes=100
    )
    # 10 Mbit/s, 8e-4 ms/byte. k=0: 0 + 2 + 2100·8e-4 (1.68) + 1.5 = 5.18; k=1: 2 + 2 + 64100·8e-4 (51.28) + 1 = 56.28
    # k=2: 3 + 2 + 1100·8e-4 (0.88) + 0.5 = 6.38; k=3: 23. The text is cheap to send: k=0.
    assert predict_ms(costs, Link(10e6, 2.0)) == pytest.approx([5.18, 56.28, 6.38, 23.0])
    assert choose_split(costs, Link(10e6, 2.0)) == 0
    # 1 Mbit/s, 8e-3 ms/byte. k=0: 2 + 16.8 + 1.5 = 20.3; k=1: 2 + 2 + 512.8 + 1 = 517.8; k=2: 3 + 2 + 8.8 + 0.5 = 14.3;
    # k=3: 23. Pooling locally and sending 1 kB beats both the text and the slow local head: k=2.
    assert predict_ms(costs, Link(1e6, 2.0)) == pytest.approx([20.3, 517.8, 14.3, 23.0])
    assert choose_split(costs, Link(1e6, 2.0)) == 2


def test_ties_go_to_the_smaller_split() -> None:
    # transfer 8000 · 1000 / 8e6 = 1 ms. k=0: 0 + 0 + 1 + (1 + 1) = 3; k=1: 1 + 0 + 1 + 1 = 3; k=2: 6.
    costs = SplitCosts(client_ms=(1.0, 5.0), server_ms=(1.0, 1.0), transfer_bytes=(1_000, 1_000))
    assert predict_ms(costs, Link(8e6, 0.0)) == pytest.approx([3.0, 3.0, 6.0])
    assert choose_split(costs, Link(8e6, 0.0)) == 0
    # With a 1 ms round trip and client (1, 3): k=0: 1 + 1 + 2 = 4; k=1: 1 + 1 + 1 + 1 = 4; k=2: 4. A three-way tie.
    assert choose_split(SplitCosts((1.0, 3.0), (1.0, 1.0), (1_000, 1_000)), Link(8e6, 1.0)) == 0


def test_ties_survive_floating_point_rounding() -> None:
    # k=0: 0 + 0.1 + 0.8 + (0.1 + 0.2) = 1.2000000000000002; k=1: 0.1 + 0.1 + 0.8 + 0.2 = 1.2 — equal on paper.
    costs = SplitCosts(client_ms=(0.1, 50.0), server_ms=(0.1, 0.2), transfer_bytes=(1_000, 1_000))
    link = Link(10e6, 0.1)
    first, second, _ = predict_ms(costs, link)
    assert first == pytest.approx(second) and first > second  # the rounding favours k=1 by one ulp
    assert choose_split(costs, link) == 0


def test_allowed_restricts_the_candidates() -> None:
    fast, slow = Link(100e6, RTT_MS), Link(100e3, RTT_MS)
    # Fast link without k=0 and k=1 (say the server cannot tokenize): best of 29.08, 67.08, 105.08, 84 is k=2.
    assert choose_split(PROFILE, fast, allowed={2, 3, 4, 5}) == 2
    # A client without the full model cannot run everything: on the slow link k=1 (171.5) beats k=0 (411).
    assert choose_split(PROFILE, slow, allowed=range(5)) == 1
    assert choose_split(PROFILE, slow, allowed=[5]) == 5
    with pytest.raises(ValueError, match="no split point"):
        choose_split(PROFILE, fast, allowed=())
    with pytest.raises(ValueError, match=r"outside 0\.\.5"):
        choose_split(PROFILE, fast, allowed={0, 6})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"client_ms": (), "server_ms": (), "transfer_bytes": ()}, "at least one unit"),
        ({"client_ms": (1.0, 2.0), "server_ms": (1.0,), "transfer_bytes": (1, 2)}, "server_ms has 1 values"),
        ({"client_ms": (1.0,), "server_ms": (1.0,), "transfer_bytes": (1, 2)}, "transfer_bytes has 2 values"),
        ({"client_ms": (-1.0,), "server_ms": (1.0,), "transfer_bytes": (1,)}, "client_ms must be finite"),
        ({"client_ms": (1.0,), "server_ms": (math.nan,), "transfer_bytes": (1,)}, "server_ms must be finite"),
        ({"client_ms": (1.0,), "server_ms": (1.0,), "transfer_bytes": (-1,)}, "transfer_bytes must be finite"),
        ({"client_ms": (1.0,), "server_ms": (1.0,), "transfer_bytes": (1,), "result_bytes": -5}, "result_bytes"),
    ],
)
def test_split_costs_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SplitCosts(**kwargs)  # type: ignore[arg-type]


def test_split_costs_store_tuples_and_links_are_validated() -> None:
    costs = SplitCosts([1.0], [2.0], [3])  # type: ignore[arg-type]
    assert costs.client_ms == (1.0,) and costs.transfer_bytes == (3,) and costs.units == 1
    assert hash(costs) == hash(SplitCosts((1.0,), (2.0,), (3,)))
    with pytest.raises(ValueError, match="bandwidth_bps"):
        Link(0.0, 1.0)
    with pytest.raises(ValueError, match="rtt_ms"):
        Link(1e6, -1.0)
    with pytest.raises(ValueError, match="queue_wait_ms"):
        predict_ms(costs, Link(1e6, 1.0), queue_wait_ms=-1.0)


def test_single_unit_model_compares_remote_and_local() -> None:
    # K = 1: k=0 sends 1000 bytes at 8e6 (1 ms): 2 + 1 + 3 = 6; k=1 is the local 4.
    costs = SplitCosts((4.0,), (3.0,), (1_000,))
    assert predict_ms(costs, Link(8e6, 2.0)) == pytest.approx([6.0, 4.0])
    assert choose_split(costs, Link(8e6, 2.0)) == 1


def test_the_current_point_is_kept_through_a_near_tie_and_left_for_a_clear_gain() -> None:
    # One unit: k=0 costs 2 ms of round trip + 20 ms on the server, k=1 runs 20.x ms locally.
    def costs(local_ms: float) -> SplitCosts:
        return SplitCosts((local_ms,), (20.0,), (0,))

    link = Link(8e6, 2.0)
    assert choose_split(costs(21.0), link) == 1
    # The server path is now predicted 0.5 ms faster than the current local one: within the margin
    # (5% of 22 ms = 1.1 ms), so the client stays; a 4 ms gain moves it.
    assert choose_split(costs(22.5), link) == 0
    assert choose_split(costs(22.5), link, current=1) == 1
    assert choose_split(costs(26.0), link, current=1) == 0
    # Small predictions: the floor (0.5 ms) decides, not the 5%.
    small = SplitCosts((1.3,), (0.5,), (0,))
    assert choose_split(small, Link(8e6, 0.5), current=1) == 1  # 0.3 ms faster: stay
    assert choose_split(SplitCosts((1.7,), (0.5,), (0,)), Link(8e6, 0.5), current=1) == 0  # 0.7 ms: go
    # A current point outside the allowed ones is no anchor.
    assert choose_split(costs(22.5), link, allowed=[0], current=1) == 0


def test_server_unit_ms_scales_the_client_profile() -> None:
    # Client total 84 → server total 8.4: every unit 10× faster.
    assert server_unit_ms((1.0, 2.0, 40.0, 40.0, 1.0), 8.4) == pytest.approx((0.1, 0.2, 4.0, 4.0, 0.1))
    assert sum(server_unit_ms([3.0, 7.0], 25.0)) == pytest.approx(25.0)
    # A profile of zeros says nothing about relative costs: spread 2 ms over 4 units evenly.
    assert server_unit_ms((0.0, 0.0, 0.0, 0.0), 2.0) == (0.5, 0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="at least one unit"):
        server_unit_ms((), 1.0)
    with pytest.raises(ValueError, match="non-negative"):
        server_unit_ms((1.0, -1.0), 1.0)
    with pytest.raises(ValueError, match="server_total_ms"):
        server_unit_ms((1.0,), math.inf)


def test_queue_wait_from_the_server_cost_model() -> None:
    cost = CostModel(overhead_ms=2.0, ms_per_token=0.5, segments=4, max_batch_tokens=400)
    # half the running bulk segment (2 + 0.5·400) / 4 / 2 = 25.25; queued real-time work 3 × 10 tokens × 0.5 = 15.
    assert queue_wait_ms(cost, queued_tasks=3, task_tokens=10, bulk_busy=True) == pytest.approx(40.25)
    assert queue_wait_ms(cost, queued_tasks=3, task_tokens=10, bulk_busy=False) == pytest.approx(15.0)
    assert queue_wait_ms(cost, queued_tasks=0, task_tokens=10, bulk_busy=False) == pytest.approx(0.0)
    assert queue_wait_ms(None, queued_tasks=100, task_tokens=10, bulk_busy=True) == 0.0


# --- the link estimator -------------------------------------------------------------------------------


def network_ms(n_bytes: int, bandwidth_bps: float, rtt_ms: float) -> float:
    return rtt_ms + 8000.0 * n_bytes / bandwidth_bps


SIZES = [400, 2_000, 20_000, 150_000, 600_000, 1_000]  # text, token ids, hidden states, in a repeating mix


def feed(estimator: LinkEstimator, n: int, bandwidth_bps: float, rtt_ms: float) -> None:
    for size in itertools.islice(itertools.cycle(SIZES), n):
        estimator.observe(size, 200, network_ms(size + 200, bandwidth_bps, rtt_ms))


def test_estimator_starts_at_its_priors() -> None:
    estimator = LinkEstimator(prior_bandwidth_bps=5e6, prior_rtt_ms=3.0)
    assert estimator.link() == Link(5e6, 3.0) and estimator.samples == 0
    assert LinkEstimator().link() == Link(10e6, 1.0)


def test_estimator_recovers_bandwidth_and_rtt_from_varied_sizes() -> None:
    estimator = LinkEstimator()
    feed(estimator, 30, bandwidth_bps=20e6, rtt_ms=12.0)
    link = estimator.link()
    assert link.bandwidth_bps == pytest.approx(20e6, rel=0.01)
    assert link.rtt_ms == pytest.approx(12.0, rel=0.01)
    assert estimator.samples == 30


def test_estimator_recovers_the_link_through_jitter() -> None:
    rng = np.random.default_rng(7)
    estimator = LinkEstimator()
    for size in itertools.islice(itertools.cycle(SIZES), 200):
        jitter = float(rng.exponential(1.0))  # queueing delay: always positive, mean 1 ms
        estimator.observe(size, 0, network_ms(size, 50e6, 8.0) + jitter)
    link = estimator.link()
    assert link.bandwidth_bps == pytest.approx(50e6, rel=0.05)
    assert link.rtt_ms == pytest.approx(9.0, abs=0.5)  # the round trip absorbs the mean jitter


def test_one_message_size_keeps_the_prior_bandwidth_and_fits_the_rtt() -> None:
    estimator = LinkEstimator(prior_bandwidth_bps=10e6)
    for _ in range(10):
        # 2500 bytes on a 50 Mbit/s link with 7 ms rtt: 7 + 0.4 = 7.4 ms observed.
        estimator.observe(2_000, 500, network_ms(2_500, 50e6, 7.0))
    link = estimator.link()
    assert link.bandwidth_bps == 10e6
    assert link.rtt_ms == pytest.approx(7.4 - 8000 * 2_500 / 10e6)  # 7.4 - 2 = 5.4


def test_small_noisy_messages_do_not_identify_the_bandwidth() -> None:
    # Text of 200–2000 bytes: a 50 Mbit/s link spreads them by 0.3 ms, well inside 1 ms of jitter.
    rng = np.random.default_rng(3)
    estimator = LinkEstimator(prior_bandwidth_bps=10e6)
    for _ in range(100):
        size = int(rng.integers(200, 2_000))
        estimator.observe(size, 0, network_ms(size, 50e6, 5.0) + float(rng.normal(0.0, 1.0)) + 3.0)
    link = estimator.link()
    assert link.bandwidth_bps == 10e6
    assert link.rtt_ms == pytest.approx(8.0, abs=1.0)


@pytest.mark.parametrize(("before_bps", "after_bps"), [(100e6, 1e6), (1e6, 100e6)])
def test_estimator_follows_a_change_of_bandwidth(before_bps: float, after_bps: float) -> None:
    estimator = LinkEstimator()
    feed(estimator, 200, before_bps, rtt_ms=4.0)
    assert estimator.link().bandwidth_bps == pytest.approx(before_bps, rel=0.01)
    feed(estimator, 60, after_bps, rtt_ms=4.0)
    link = estimator.link()
    assert link.bandwidth_bps == pytest.approx(after_bps, rel=0.05)
    assert link.rtt_ms == pytest.approx(4.0, abs=0.5)


def test_a_change_is_confirmed_after_a_streak_of_surprises() -> None:
    estimator = LinkEstimator()
    feed(estimator, 200, 100e6, rtt_ms=4.0)
    before = estimator.link()
    # Four samples far slower than predicted (1 Mbit/s) are held back as a possible change...
    for size in SIZES[1:5]:
        estimator.observe(size, 0, network_ms(size, 1e6, 4.0))
    assert estimator.link() == before
    # ...the fifth confirms it and the fit restarts from the streak (four distinct sizes: identified).
    estimator.observe(SIZES[1], 0, network_ms(SIZES[1], 1e6, 4.0))
    assert estimator.link().bandwidth_bps == pytest.approx(1e6, rel=1e-6)


def test_estimator_follows_a_change_of_rtt_on_small_messages() -> None:
    # One size, so the bandwidth stays at its prior and only the exponential weights adapt the rtt:
    # 80 observations are 4 half-lives, leaving 1/16 of the 35 ms step, 40 - 35/16 ≈ 37.8.
    estimator = LinkEstimator()
    for rtt_ms in (5.0, 40.0):
        for _ in range(80):
            estimator.observe(1_000, 0, network_ms(1_000, 10e6, rtt_ms))
    assert estimator.link().rtt_ms == pytest.approx(40.0 - 35.0 / 16, abs=0.3)


def test_garbage_samples_are_ignored() -> None:
    estimator = LinkEstimator()
    feed(estimator, 30, bandwidth_bps=20e6, rtt_ms=12.0)
    before = estimator.link()
    for sent, received, ms in [(100, 0, math.nan), (100, 0, math.inf), (100, 0, -3.0), (-1, 0, 5.0), (0, -1, 5.0)]:
        estimator.observe(sent, received, ms)
    assert estimator.link() == before and estimator.samples == 30


def test_estimator_clamps_to_sane_ranges() -> None:
    estimator = LinkEstimator()
    # Network time far below the bytes term at any plausible rate: rtt cannot go negative.
    for size in SIZES * 3:
        estimator.observe(size, 0, network_ms(size, 5e11, 0.0))
    link = estimator.link()
    assert link.bandwidth_bps == 1e11 and link.rtt_ms >= 0.0
    with pytest.raises(ValueError, match="prior_bandwidth_bps"):
        LinkEstimator(prior_bandwidth_bps=1.0)
    with pytest.raises(ValueError, match="half_life"):
        LinkEstimator(half_life=0.0)


def test_estimated_link_drives_the_choice() -> None:
    # The medium-link case above, with the link learnt from traffic instead of given.
    estimator = LinkEstimator()
    feed(estimator, 30, bandwidth_bps=1e6, rtt_ms=RTT_MS)
    assert choose_split(PROFILE, estimator.link()) == 1


def test_drift_starts_neutral_and_averages_ratios_in_log_space() -> None:
    drift = Drift(ratio=True)
    assert drift.value == 1.0
    drift.observe(20.0, 10.0)  # 2x slow; the prior (1x) counts as one call: sqrt(2)
    assert drift.value == pytest.approx(math.sqrt(2.0))
    drift.observe(5.0, 10.0)  # then 2x fast: back to the geometric mean of 1, 2 and 1/2
    assert drift.value == pytest.approx(1.0)


def test_drift_clips_one_stalled_call_and_ignores_noise_and_garbage() -> None:
    drift = Drift(ratio=True)
    drift.observe(1e6, 10.0)  # a stall: counted as 5x at most
    assert drift.value == pytest.approx(math.sqrt(5.0))
    before = drift.value
    for measured, predicted in [(10.0, 0.01), (0.0, 10.0), (float("nan"), 10.0), (-1.0, 10.0)]:
        drift.observe(measured, predicted)
    assert drift.value == before and drift.calls == 1


def test_drift_follows_a_lasting_change() -> None:
    drift = Drift(ratio=True)
    for _ in range(10):
        drift.observe(10.0, 10.0)
    for _ in range(12):  # the device became 3x slower: followed within a dozen calls
        drift.observe(30.0, 10.0)
    assert drift.value == pytest.approx(3.0, rel=0.05)


def test_drift_offset_averages_milliseconds() -> None:
    drift = Drift(ratio=False)
    assert drift.value == 0.0
    for measured in (4.0, 6.0, 8.0):
        drift.observe(measured)
    # weights 1/2, 1/3, 1/4 (the prior at 0 counts as one call): the plain mean of 0, 4, 6, 8
    assert drift.value == pytest.approx(4.5)


def test_server_state_reads_teach_the_link_its_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that runs everything locally sends no split traffic; its once-a-second state reads
    still cross the link, and their round trip replaces the estimator's prior."""
    clock = SimpleNamespace(now=0.0)
    # The client's clock, advanced only by the fake link: the learned round trip is exact.
    monkeypatch.setattr(split_client, "time", SimpleNamespace(perf_counter=lambda: clock.now, monotonic=time.monotonic))

    class SlowLinkClient:
        async def model_state(self, model: str) -> tuple[None, dict[str, int]]:
            clock.now += 0.02  # a 20 ms round trip
            return None, {}

    class NoModel:
        all_local = 3

    split = SplitClient(
        cast(AsyncClient, SlowLinkClient()), cast(LocalModel, NoModel()), model="m", link=LinkEstimator()
    )
    assert split.link.link().rtt_ms == pytest.approx(1.0)  # the prior

    async def read_three() -> None:
        for _ in range(3):
            await split._read_state()

    asyncio.run(read_three())
    assert split.link.link().rtt_ms == pytest.approx(20.0, abs=0.5)
