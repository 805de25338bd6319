"""The rate controller and the in-flight limit, under a fake clock."""

import asyncio
import math

import pytest

from pipeline.rate import KEY_LIMIT, AdaptiveRate, InFlightLimit


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def answers(rate, clock, seconds, per_second, throttled_every=0, started_at=None):
    """``per_second`` answers a second for ``seconds``; every ``throttled_every``-th is a
    429 to a request started at ``started_at`` (default: just before it)."""
    for i in range(round(seconds * per_second)):
        clock.now += 1 / per_second
        if throttled_every and i % throttled_every == throttled_every - 1:
            rate.throttled(started_at=clock.now - 0.01 if started_at is None else started_at)
        else:
            rate.admitted()


class BucketServer:
    """A server limiting to ``limit`` requests/s: a bucket of one second's worth, refilled
    at ``limit`` per second, answering ``latency`` after a request starts (429s carry
    Retry-After: 1). ``run`` drives the controller against it with the fake clock and
    returns (requests admitted, 429s, seconds taken) for ``n`` requests."""

    def __init__(self, limit, latency=0.05, concurrency=16):
        self.limit, self.latency, self.concurrency = limit, latency, concurrency

    def run(self, rate, clock, n):
        tokens, last = float(self.limit), clock.now
        in_flight, retries, admitted, throttled, started = [], [], 0, 0, 0
        begin = clock.now
        while admitted < n:
            in_flight.sort()
            pending = started < n or any(at <= clock.now for at in retries)
            if pending and len(in_flight) < self.concurrency and (wait := rate.wait_time()) == 0:
                due = [at for at in retries if at <= clock.now]
                if due:
                    retries.remove(due[0])
                else:
                    started += 1
                in_flight.append((clock.now + self.latency, clock.now))
                continue
            step = [in_flight[0][0]] if in_flight else []
            if pending and len(in_flight) < self.concurrency:
                step.append(clock.now + wait)
            step += [at for at in retries if at > clock.now]
            clock.now = max(clock.now, min(step))
            while in_flight and in_flight[0][0] <= clock.now:
                answer_at, start = in_flight.pop(0)
                tokens = min(self.limit, tokens + (answer_at - last) * self.limit)
                last = answer_at
                if tokens >= 1:
                    tokens -= 1
                    admitted += 1
                    rate.admitted()
                else:
                    throttled += 1
                    rate.throttled(start, retry_after=1.0)
                    retries.append(answer_at + 1.0)
        return admitted, throttled, clock.now - begin


def test_rate_paces_starts_at_the_cap_with_a_small_burst():
    clock = Clock()
    rate = AdaptiveRate(10, burst=2, clock=clock)
    assert [rate.wait_time() for _ in range(3)] == [0, 0, 0]  # the first and `burst` more
    assert rate.wait_time() == pytest.approx(0.1)  # then 1/rate apart
    clock.now += 0.1
    assert rate.wait_time() == 0 and rate.wait_time() == pytest.approx(0.1)
    rate._decrease(clock.now, 5, retry_after=None)  # a decrease also slows those waiting
    assert rate.wait_time() == pytest.approx(0.2)
    clock.now += 10  # idle: the burst again
    assert [rate.wait_time() for _ in range(3)] == [0, 0, 0] and rate.wait_time() > 0


def test_the_first_429_learns_the_limit_from_the_burst_and_retry_after():
    clock = Clock()
    rate = AdaptiveRate(1000, clock=clock)
    rate.wait_time()
    answers(rate, clock, 0.5, 300)  # a 100/s server let its 1 s burst through, then refilled
    wave = clock.now - 0.05
    rate.throttled(started_at=wave, retry_after=1)
    assert rate.rate == pytest.approx(0.95 * 150 / 1.5, rel=0.02)  # 150 admitted over 0.5 s + 1 s
    answers(rate, clock, 0.04, 300, throttled_every=2, started_at=wave)  # the wave: half 429
    assert rate.cuts == 1 and rate.ref == pytest.approx(100, rel=0.02)
    rate.throttled(started_at=wave)  # in flight before the decrease: no news
    assert rate.cuts == 1 and rate.rate == pytest.approx(95, rel=0.02)


def test_the_tail_of_a_wave_does_not_count_as_sustained_429s():
    clock = Clock()
    rate = AdaptiveRate(1000, clock=clock)
    rate.wait_time()
    answers(rate, clock, 0.5, 300)
    wave = clock.now - 0.05
    rate.throttled(started_at=wave, retry_after=1)
    answers(rate, clock, 0.04, 300, throttled_every=2, started_at=wave)  # confirmed: the limit
    learned = rate.rate
    answers(rate, clock, 0.03, 300, throttled_every=1, started_at=wave)  # the wave's tail: 9 more 429s
    rate.throttled(started_at=clock.now - 0.01, retry_after=1)  # one fresh 429: checked, not a cut
    assert rate.cuts == 1 and rate.rate < learned
    answers(rate, clock, 0.2, 100)
    assert rate.cuts == 1 and rate.rate == pytest.approx(learned)


def test_a_lone_429_is_checked_then_undone():
    clock = Clock()
    rate = AdaptiveRate(150, clock=clock)
    rate.wait_time()
    answers(rate, clock, 1, 100)
    rate.throttled(started_at=clock.now - 0.05, retry_after=0.05)
    assert rate.rate < 100  # at the measured limit while checked
    answers(rate, clock, 0.12, 100)  # the next 12 answers: no other 429
    assert rate.rate == 150 and rate.cuts == 0 and rate.ref == math.inf


def test_a_429_as_the_very_first_answer_halves_at_most():
    clock = Clock()
    rate = AdaptiveRate(150, clock=clock)
    rate.wait_time()
    clock.now += 0.05
    rate.throttled(started_at=clock.now - 0.05, retry_after=1)  # nothing admitted yet to measure
    assert rate.rate == pytest.approx(0.95 * 75)
    answers(rate, clock, 0.2, 100, throttled_every=2, started_at=clock.now - 0.05)  # then a wave: the limit
    assert rate.cuts == 1 and rate.rate == pytest.approx(0.95 * 75)


def test_a_lone_429_below_the_known_limit_checks_at_what_the_server_admits():
    clock = Clock()
    rate = AdaptiveRate(1000, clock=clock)
    rate.wait_time()
    answers(rate, clock, 1, 300)
    rate._decrease(clock.now, 150, retry_after=None)  # known limit: about 158
    answers(rate, clock, 0.5, 140)
    rate.throttled(started_at=clock.now - 0.01, retry_after=1)  # below it: checked
    # The burst's Retry-After window belongs to the first 429 only, not to this measure.
    assert rate.rate == pytest.approx(0.95 * 140, rel=0.05)
    answers(rate, clock, 0.12, 140)
    assert rate.cuts == 1 and rate.rate > 150


def test_random_429s_do_not_compound_into_a_crawl():
    clock = Clock()
    rate = AdaptiveRate(150, clock=clock)
    rate.wait_time()
    answers(rate, clock, 30, 150, throttled_every=40)  # 2.5% of the answers, spread out
    assert rate.rate == 150 and rate.cuts == 0


def test_429_at_the_known_limit_decreases_to_what_the_server_admits():
    clock = Clock()
    rate = AdaptiveRate(1000, clock=clock)
    rate.wait_time()
    answers(rate, clock, 1, 300)
    rate._decrease(clock.now, 150, retry_after=None)  # known limit: 150 / 0.95
    answers(rate, clock, 2, 100)  # the server admits 100/s; meanwhile the rate grows past 158
    rate.throttled(started_at=clock.now - 0.01, retry_after=1)  # at the known limit: at once
    assert rate.cuts == 2 and rate.rate == pytest.approx(95, rel=0.03)  # 0.95 × what was admitted
    assert rate.ref == pytest.approx(100, rel=0.03)


def test_probe_waits_for_retry_after_then_grows_additively_up_to_the_cap():
    clock = Clock()
    rate = AdaptiveRate(120, clock=clock)
    rate.wait_time()
    answers(rate, clock, 1, 100)
    rate._decrease(clock.now, 80, retry_after=1)
    start = clock.now
    clock.now = start + 1  # Retry-After: no probing yet
    rate.wait_time()
    assert rate.rate == 80
    clock.now = start + 3  # then +5% of 80 per second
    rate.wait_time()
    assert rate.rate == pytest.approx(88)
    clock.now = start + 100
    rate.wait_time()
    assert rate.rate == 120  # never above the cap (--max-rps)


def test_sustained_429s_below_the_known_limit_decrease_too():
    clock = Clock()
    rate = AdaptiveRate(200, clock=clock)
    rate.wait_time()
    answers(rate, clock, 1, 100)
    rate._decrease(clock.now, 100, retry_after=None)  # ref 105
    answers(rate, clock, 1, 100, throttled_every=5)  # 20% of answers: the limit moved down
    assert rate.cuts >= 2 and rate.rate < 90


@pytest.mark.parametrize("n", [400, 1000])
def test_against_a_100_per_second_server_with_the_default_cap(n):
    clock = Clock()
    rate = AdaptiveRate(195, clock=clock)
    admitted, throttled, seconds = BucketServer(100).run(rate, clock, n)
    assert admitted / seconds >= 90 and throttled <= 0.02 * (admitted + throttled)
    assert 90 <= rate.ref <= 130 and rate.cuts <= 3


def test_far_above_the_limit_only_the_first_wave_is_throttled():
    clock = Clock()
    rate = AdaptiveRate(1000, clock=clock)  # pace 320/s (16 in flight, 50 ms) vs a 100/s server
    admitted, throttled, seconds = BucketServer(100).run(rate, clock, 1000)
    # In flight when the burst ran out: 16 requests, about 11 of them beyond the refill.
    assert admitted / seconds >= 90 and throttled <= 16 and rate.cuts <= 3


def test_the_rate_starts_at_the_key_limit_and_doubles_every_ramp_until_a_429():
    clock = Clock()
    assert AdaptiveRate(150, clock=clock).rate == 150  # a cap below the key's limit: at once
    rate = AdaptiveRate(5000, clock=clock)
    assert rate.rate == KEY_LIMIT
    rate.wait_time()
    answers(rate, clock, 0.5, 400)  # answered at about the rate: twice it after 0.5 s
    assert 1.6 * KEY_LIMIT <= rate.rate <= 2.5 * KEY_LIMIT
    answers(rate, clock, 0.5, 20)  # few answers (the in-flight limit binds): hardly any growth
    grown = rate.rate
    assert grown <= 2.6 * KEY_LIMIT
    rate.throttled(started_at=clock.now - 0.01, retry_after=1)  # the limit: no more ramp
    answers(rate, clock, 0.05, 400, throttled_every=2, started_at=clock.now - 0.01)
    learned = rate.rate
    answers(rate, clock, 0.5, 100)  # within Retry-After: neither ramp nor probe
    assert rate.cuts == 1 and rate.rate == learned < grown


def test_a_lone_429_during_the_ramp_resumes_it():
    clock = Clock()
    rate = AdaptiveRate(5000, clock=clock)
    rate.wait_time()
    answers(rate, clock, 0.5, 300)
    before = rate.rate
    rate.throttled(started_at=clock.now - 0.01, retry_after=1)
    answers(rate, clock, 0.05, 300)  # no other 429: lone
    assert rate.cuts == 0 and rate.rate >= before
    answers(rate, clock, 0.5, 600)
    assert rate.rate > 1.5 * before


@pytest.mark.parametrize("concurrency", [16, 32])
def test_the_ramp_keeps_the_first_wave_small_with_many_in_flight(concurrency):
    # 32 in flight at 50 ms is a pace of 640/s; at once, about 27 would meet the empty bucket.
    clock = Clock()
    rate = AdaptiveRate(1000, clock=clock)
    admitted, throttled, seconds = BucketServer(100, concurrency=concurrency).run(rate, clock, 1000)
    assert admitted / seconds >= 90 and throttled <= 0.02 * (admitted + throttled)


def test_probing_settles_at_the_limit_not_at_what_a_refilled_bucket_let_through():
    # Below the limit the bucket saves tokens; a probe spends them before its first 429,
    # so the last second admitted more than the limit: that must not become the rate.
    clock = Clock()
    rate = AdaptiveRate(1000, clock=clock)
    admitted, throttled, seconds = BucketServer(100).run(rate, clock, 3000)
    assert rate.ref <= 102 and rate.rate <= 100
    assert throttled <= 0.01 * (admitted + throttled)


def test_a_server_above_the_cap_is_never_throttled():
    clock = Clock()
    rate = AdaptiveRate(195, clock=clock)
    admitted, throttled, seconds = BucketServer(200, concurrency=64).run(rate, clock, 2000)
    assert throttled == 0 and rate.cuts == 0 and admitted / seconds >= 0.95 * 195


def test_in_flight_slow_start_from_4_to_concurrency():
    async def scenario():
        limit = InFlightLimit(maximum=32, initial=4)
        for _ in range(4):
            await limit.acquire()
        assert limit.in_flight == 4 and not limit._slots._value  # a fifth waits
        for _ in range(40):  # each finished request opens one more slot, up to 32
            limit.release()
            await limit.acquire()
        assert limit.limit == 32 and limit.in_flight == 4 and limit._slots._value == 28

    asyncio.run(scenario())
