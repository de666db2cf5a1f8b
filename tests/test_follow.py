"""``jobs.follow``: every seq once, in order, from pushes and the log; the channel layer's outages outlasted.

Real PostgreSQL for the log, real Redis for the channel layer. What the
WebSocket and the SSE stream do with it is in test_websocket*.py and
test_sse.py.
"""

import asyncio

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels_redis.core import RedisChannelLayer

from jobs import selectors
from jobs.follow import REPLAY_BATCH, EventFollower, PushInbox
from jobs.publisher import group_name
from tests.test_websocket import fake_events, in_thread, new_job

pytestmark = pytest.mark.django_db(transaction=True)


async def collect(events):
    return [event async for event in events]


def seqs(events):
    return [event["seq"] for event in events]


async def follower_of(job, *, after=0, **kwargs):
    return EventFollower(job.pk, after=after, inbox=PushInbox(get_channel_layer()), **kwargs)


class Clock:
    """A hand-driven monotonic clock for the follower's reorder wait."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def counting_reads():
    """A log reader that counts its calls."""
    calls = []

    async def read_events(job_id, **kwargs):
        calls.append(kwargs)
        return await database_sync_to_async(selectors.job_events)(job_id, **kwargs)

    return read_events, calls


def test_a_push_that_overtook_an_earlier_one_waits_for_it_without_reading_the_log(registry, settings):
    # Given three events in the log, and a follower that has delivered nothing
    settings.CAO_FOLLOW_REORDER_WAIT_S = 0.2
    job = new_job(registry)
    payloads = fake_events(job, 3, publish=False)
    read_events, reads = counting_reads()
    gaps = []

    async def scenario():
        follower = await follower_of(job, read_events=read_events, on_gap=lambda: gaps.append(1), clock=Clock())
        # When 2 and 3 are pushed before 1 (another worker's push was slower)
        early = await collect(follower.pushed([payloads[1]])) + await collect(follower.pushed([payloads[2]]))
        held = follower.gap_wait_s()
        # ... and then 1 arrives
        late = await collect(follower.pushed([payloads[0]]))
        return early, held, late, follower.gap_wait_s()

    early, held, late, after = async_to_sync(scenario)()

    # Then nothing is delivered out of order, and 1, 2, 3 follow its arrival, without a read of the log
    assert early == [] and held == pytest.approx(0.2) and gaps == [1]
    assert seqs(late) == [1, 2, 3] and after is None
    assert reads == []


def test_a_gap_still_open_after_the_reorder_wait_is_filled_from_the_log(registry, settings):
    # Given a follower that has delivered nothing, and three events in the log
    settings.CAO_FOLLOW_REORDER_WAIT_S = 0.25
    job = new_job(registry)
    payloads = fake_events(job, 3, publish=False)
    clock = Clock()

    async def scenario():
        follower = await follower_of(job, clock=clock)
        # When only the third one's push arrives (the first two were lost)...
        early = await collect(follower.pushed([payloads[2]]))
        clock.now += 0.125
        halfway = follower.gap_wait_s()
        # ... and the wait runs out
        clock.now += 0.125
        due = follower.gap_wait_s()
        return early, halfway, due, await collect(follower.fill_gap()), follower.last_seq, follower.gap_wait_s()

    early, halfway, due, filled, last_seq, after = async_to_sync(scenario)()

    # Then 1 and 2 come from the log before 3
    assert early == [] and halfway == 0.125 and due == 0
    assert seqs(filled) == [1, 2, 3] and last_seq == 3 and after is None


def test_without_a_reorder_wait_a_push_after_a_gap_brings_the_missing_events_from_the_log_first(registry, settings):
    settings.CAO_FOLLOW_REORDER_WAIT_S = 0
    job = new_job(registry)
    payloads = fake_events(job, 3, publish=False)

    async def scenario():
        follower = await follower_of(job)
        return await collect(follower.pushed([payloads[2]])), follower.last_seq

    delivered, last_seq = async_to_sync(scenario)()

    assert seqs(delivered) == [1, 2, 3] and last_seq == 3


def test_a_resync_delivers_the_held_pushes_after_what_they_overtook(registry, settings):
    settings.CAO_FOLLOW_REORDER_WAIT_S = 0.2
    job = new_job(registry)
    payloads = fake_events(job, 3, publish=False)

    async def scenario():
        follower = await follower_of(job, clock=Clock())
        await collect(follower.pushed([payloads[2]]))
        return await collect(follower.resync()), follower.early, follower.gap_wait_s()

    resynced, early, after = async_to_sync(scenario)()

    assert seqs(resynced) == [1, 2, 3] and early == {} and after is None


def test_a_push_already_delivered_is_dropped(registry):
    job = new_job(registry)
    payloads = fake_events(job, 2, publish=False)

    async def scenario():
        follower = await follower_of(job)
        replayed = await collect(follower.replay())
        # The same events pushed again (a retried push), then one pushed twice in one message
        again = await collect(follower.pushed(payloads))
        more = await in_thread(fake_events, job, 1, publish=False)
        twice = await collect(follower.pushed(more + more))
        return replayed, again, twice

    replayed, again, twice = async_to_sync(scenario)()

    assert seqs(replayed) == [1, 2] and again == [] and seqs(twice) == [3]


def test_a_push_beyond_what_the_log_holds_waits_for_a_resync_instead_of_skipping_the_gap(registry):
    job = new_job(registry)
    ahead = {"type": "STEP_STARTED", "job_id": str(job.pk), "seq": 3}

    async def scenario():
        follower = await follower_of(job)
        pushed = await collect(follower.pushed([ahead]))
        return pushed, await collect(follower.fill_gap()), follower.last_seq

    assert async_to_sync(scenario)() == ([], [], 0)


def test_the_replay_reads_the_log_in_batches_to_its_end(registry):
    job = new_job(registry)
    fake_events(job, REPLAY_BATCH + 2, publish=False)

    async def scenario():
        follower = await follower_of(job, after=1)
        return await collect(follower.replay())

    assert seqs(async_to_sync(scenario)()) == list(range(2, REPLAY_BATCH + 3))


def test_the_replay_joins_the_group_before_it_reads_the_log(registry):
    # Given a job with one event, and a log read right after which the next
    # event is committed and pushed (the race the order of the two closes)
    job = new_job(registry)
    fake_events(job, 1, publish=False)
    layer = get_channel_layer()
    pushed_after_read = []

    async def read_events(job_id, **kwargs):
        events = await database_sync_to_async(selectors.job_events)(job_id, **kwargs)
        if not pushed_after_read:
            pushed_after_read.extend(await in_thread(fake_events, job, 1, publish=False))
            await layer.group_send(group_name(job_id), {"type": "job.events", "events": pushed_after_read})
        return events

    async def scenario():
        follower = await follower_of(job, read_events=read_events)
        replayed = await collect(follower.replay())
        # When the follower then takes what was pushed to it
        message = await asyncio.wait_for(follower.inbox.receive(), 10)
        return replayed, await collect(follower.messages(message))

    replayed, live = async_to_sync(scenario)()

    # Then the push committed after the read reached it: it had joined first
    assert seqs(replayed) == [1] and seqs(live) == [2]


def test_a_resync_delivers_what_was_committed_but_never_pushed(registry):
    job = new_job(registry)

    async def scenario():
        follower = await follower_of(job)
        first = await collect(follower.replay())
        await in_thread(fake_events, job, 2, publish=False)
        return first, await collect(follower.resync())

    first, resynced = async_to_sync(scenario)()

    assert first == [] and seqs(resynced) == [1, 2]


def test_the_resync_falls_due_only_after_an_interval_without_pushes(registry, settings):
    # Given a follower resyncing after 4 s of silence
    settings.CAO_WS_RESYNC_S = 4
    job = new_job(registry)
    payloads = fake_events(job, 1, publish=False)
    clock = Clock()

    async def scenario():
        follower = await follower_of(job, clock=clock)
        due = [follower.resync_wait_s()]
        # When a push arrives 3 s in, the resync moves to 4 s after it
        clock.now += 3
        await collect(follower.pushed(payloads))
        clock.now += 3
        due.append(follower.resync_wait_s())
        clock.now += 1
        due.append(follower.resync_wait_s())
        # ... and a resync restarts the wait too
        await collect(follower.resync())
        due.append(follower.resync_wait_s())
        return due

    assert async_to_sync(scenario)() == [4, 1, 0, 4]


def test_no_resync_falls_due_when_resyncs_are_off_or_the_job_is_done(registry, settings):
    job = new_job(registry)

    async def scenario():
        settings.CAO_WS_RESYNC_S = 0
        off = (await follower_of(job)).resync_wait_s()
        settings.CAO_WS_RESYNC_S = 4
        follower = await follower_of(job)
        await collect(follower.pushed([{"type": "JOB_COMPLETED", "job_id": str(job.pk), "seq": 1}]))
        return off, follower.resync_wait_s()

    assert async_to_sync(scenario)() == (None, None)


def test_the_final_events_mark_the_follower_finished(registry):
    job = new_job(registry)

    async def scenario():
        follower = await follower_of(job)
        before = follower.finished
        final = {"type": "JOB_COMPLETED", "job_id": str(job.pk), "seq": 1}
        await collect(follower.pushed([final]))
        return before, follower.finished

    assert async_to_sync(scenario)() == (False, True)


@pytest.mark.timeout(60)
def test_the_inbox_waits_out_a_channel_layer_outage_and_receives_again(private_redis):
    # Given an inbox on a channel layer whose Redis is down
    layer = RedisChannelLayer(hosts=[private_redis.url(0)], prefix="follow-test")
    private_redis.stop(kill=True)

    async def scenario():
        retried = asyncio.Event()
        backoff = asyncio.sleep

        async def counted_backoff(seconds):
            if inbox.failures >= 2:  # it tried, failed, and tried again
                retried.set()
            await backoff(seconds)

        inbox = PushInbox(layer, await layer.new_channel(), retry_s=(0.05,), sleep=counted_backoff)
        receiving = asyncio.ensure_future(inbox.receive())
        await asyncio.wait_for(retried.wait(), 20)
        assert not receiving.done(), receiving
        # When Redis is back and a message is sent to the channel
        await asyncio.to_thread(private_redis.start)
        await layer.send(inbox.channel_name, {"type": "job.events", "events": []})
        message = await asyncio.wait_for(receiving, 20)
        await layer.flush()
        return message, inbox.failures

    # Then the receive that was waiting returns it, and the inbox counts no failure any more
    assert async_to_sync(scenario)() == ({"type": "job.events", "events": []}, 0)
