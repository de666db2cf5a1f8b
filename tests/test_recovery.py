"""Recovery in seconds: dead processes and Redis data loss, noticed within a tick.

Real PostgreSQL, Redis and broker; the dead processes are real ones that
exited, or identities whose heartbeat really lapsed in Redis.
"""

import json
import subprocess
import sys

import dramatiq
import pytest
from dramatiq.brokers.redis import RedisBroker
from django.utils import timezone

from jobs.models import Job, JobStatus, StepAttempt, StepState
from orchestration.commands import submit_job
from orchestration.messages import lease_member
from orchestration.per_process import get_keeper, get_limiter, get_liveness
from orchestration.liveness import WAKE_KEY, ProcessIdentity
from orchestration.recovery import Recovery
from tests.conftest import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def queued(queue):
    broker = dramatiq.get_broker()
    return broker.client.llen(f"{broker.namespace}:{queue}")


def running_step(*, owner, ttl_s=600):
    """A job whose first step's call is in flight under ``owner``, with a long lease."""
    job, _ = submit_job(feature_name="business_plan", input_data={"topic": "tea"})
    now = timezone.now()
    Job.objects.filter(pk=job.pk).update(
        status=JobStatus.RUNNING, step_state=StepState.RUNNING, step_attempt=1, step_started_at=now
    )
    StepAttempt.objects.create(job_id=job.pk, step_index=0, service="prompt_enhancer", attempt=1, token=1, started_at=now)
    member = lease_member(job.pk, 0, 1)
    assert get_limiter().acquire("prompt_enhancer", member, limit=1, ttl_s=ttl_s, payload="p", owner=owner).granted
    return Job.objects.get(pk=job.pk), member


def exited_process_identity():
    """The identity of a real process of this host that has exited."""
    code = (
        "import sys; sys.path.insert(0, '.');"
        "from orchestration.liveness import ProcessIdentity;"
        "print(ProcessIdentity.current(broker_id='dead-broker').to_json())"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return ProcessIdentity.from_json(output.strip().splitlines()[-1])


def test_a_dead_process_is_certainly_dead_and_a_live_one_is_not():
    dead = exited_process_identity()
    alive = ProcessIdentity.current()

    assert dead.certainly_dead()
    assert not alive.certainly_dead()
    # On another host (another kernel boot), nothing can be known for sure
    assert not ProcessIdentity(**{**json.loads(dead.to_json()), "boot_id": "another-boot"}).certainly_dead()


def test_a_process_whose_heartbeat_lapsed_loses_its_slots_and_its_step_runs_again_at_once(registry, redis_db):
    # Given a call in flight under a process that then stops beating (its lease would last 10 minutes)
    liveness = get_liveness()
    ghost = ProcessIdentity.current()
    liveness.beat(ghost, dead_after_s=60)
    job, member = running_step(owner=ghost.id)
    liveness.declare_dead([ghost.id])  # as if its 60 s passed without a beat
    messages_before = queued("default")

    # When the scheduler ticks
    report = Recovery().tick()

    # Then the slot is free, the attempt LOST, and the step re-sent under a new token
    assert report.dead_processes == [ghost.id] and report.reclaimed_slots == 1 and report.lost_attempts == 1
    assert get_limiter().locate("prompt_enhancer", member) is None
    job.refresh_from_db()
    assert (job.step_state, job.step_token, job.status) == (StepState.QUEUED, 2, JobStatus.RUNNING)
    assert StepAttempt.objects.get(job=job, token=1).error_code == "WORKER_LOST"
    assert queued("default") == messages_before + 1
    assert liveness.check()[1] == []  # handled once


def test_a_process_that_beats_keeps_its_slots(registry, redis_db):
    keeper = get_keeper()
    job, member = running_step(owner=keeper.owner)
    lease = keeper.track("prompt_enhancer", member, 600)
    try:
        keeper.tick()  # the heartbeat is due at once for a newly tracked lease

        report = Recovery().tick()

        assert report.dead_processes == []
        assert get_limiter().locate("prompt_enhancer", member) == "holder"
    finally:
        keeper.untrack(lease)


def test_a_starting_worker_declares_its_hosts_dead_processes_and_wakes_the_scheduler(registry, redis_db):
    from orchestration.middleware import AnnounceWorker

    # Given a process of this host that died holding a slot, its heartbeat not yet lapsed
    dead = exited_process_identity()
    get_liveness().beat(dead, dead_after_s=3600)
    job, member = running_step(owner=dead.id)

    # When a worker starts on the same host
    AnnounceWorker().after_worker_boot(dramatiq.get_broker(), worker=None)

    # Then the scheduler is woken, and its next tick recovers the step at once
    assert redis_db.lrange(WAKE_KEY, 0, -1)
    report = Recovery().tick()
    assert report.dead_processes == [dead.id]
    assert get_limiter().locate("prompt_enhancer", member) is None
    assert Job.objects.get(pk=job.pk).step_token == 2


def test_the_messages_a_dead_process_had_fetched_go_back_to_their_queue(registry, redis_db):
    # Given a worker process that fetched a step message, then died (its broker heartbeat still fresh)
    submit_job(feature_name="business_plan", input_data={"topic": "tea"})
    broker = dramatiq.get_broker()
    doomed = RedisBroker(client=broker.client, namespace=broker.namespace, middleware=[])
    assert len(doomed.do_fetch("default", 10)) == 1
    assert queued("default") == 0
    identity = ProcessIdentity(id="doomed", host="elsewhere", pid=1, broker_id=doomed.broker_id)
    get_liveness().beat(identity, dead_after_s=60)
    get_liveness().declare_dead([identity.id])

    # When the scheduler ticks
    Recovery().tick()

    # Then the message is back, long before the broker's own 60 s heartbeat timeout
    assert queued("default") == 1


def test_heartbeats_restored_from_a_snapshot_are_not_trusted_until_processes_beat_again(registry, redis_db, settings):
    settings.CAO_WORKER_DEAD_AFTER_S = 30
    recovery = Recovery()
    recovery.tick()
    ghost = ProcessIdentity.current()
    get_liveness().beat(ghost, dead_after_s=60)
    running_step(owner=ghost.id)
    get_liveness().declare_dead([ghost.id])

    # A restart (the run_id changes) with a lapsed heartbeat restored from the snapshot
    recovery.run_id = "a-previous-run"
    report = recovery.tick()

    assert report.redis_restarted and report.dead_processes == []


def test_a_redis_restart_is_seen_and_lost_queued_steps_are_resent_within_the_tick(registry, redis_db, settings):
    # Given a step queued a moment ago (within the 30 s grace), then Redis restarts empty
    settings.CAO_REDISPATCH_GRACE_S = 30
    recovery = Recovery()
    recovery.tick()
    job, _ = submit_job(feature_name="business_plan", input_data={"topic": "tea"})
    redis_db.flushdb()
    recovery.run_id = "the-run-before-the-restart"  # as the check would find after a restart

    report = recovery.tick()

    assert report.redis_restarted and report.maintenance.redispatched == 1
    assert Job.objects.get(pk=job.pk).step_token == 2 and queued("default") == 1


def test_a_lapsed_lease_reaches_the_next_waiter_within_a_tick(registry, redis_db):
    # A timed-out call's held slot, or a dead holder without an owner, expires;
    # the waiter behind it must not wait for the next full maintenance pass.
    from orchestration.messages import handoff_payload
    from jobs.outcomes import StepDispatch

    limiter = get_limiter()
    from services_registry.models import Service

    Service.objects.filter(name="prompt_enhancer").update(concurrency_limit=1)
    limiter.acquire("prompt_enhancer", "expiring", limit=1, ttl_s=0.05, payload="x")
    job, _ = submit_job(feature_name="business_plan", input_data={"topic": "tea"})
    member = lease_member(job.pk, 0, 1)
    payload = handoff_payload(StepDispatch(job.pk, 0, 1, "prompt_enhancer"))
    assert not limiter.acquire("prompt_enhancer", member, limit=1, ttl_s=15, payload=payload).granted
    wait_for(lambda: not limiter.occupancy("prompt_enhancer").holders, message="the lease to lapse")

    Recovery().tick()

    assert limiter.locate("prompt_enhancer", member) == "granted"


def test_one_scheduler_leads_the_other_stands_by_then_takes_over(redis_db):
    from orchestration.management.commands.run_scheduler import LOCK_KEY, Command

    leader, standby = Command(), Command()

    assert leader._lead("a", ttl_s=5) and not standby._lead("b", ttl_s=5)
    assert leader._lead("a", ttl_s=5)  # the leader extends its own lock
    assert 4000 < redis_db.pttl(LOCK_KEY) <= 5000
    redis_db.delete(LOCK_KEY)  # the leader died: its lock expired
    assert standby._lead("b", ttl_s=5) and not leader._lead("a", ttl_s=5)


# --- The heartbeat, as the lease keeper sends it ------------------------------------------------


def keeper_with_heartbeat(clock):
    from orchestration.lease_keeper import LeaseKeeper
    from orchestration.liveness import ProcessHeartbeat

    identity = ProcessIdentity.current()
    heartbeat = ProcessHeartbeat(get_liveness(), identity, period_s=1.0, dead_after_s=5.0)
    return LeaseKeeper(get_limiter(), clock=clock, autostart=False, heartbeat=heartbeat), identity


def registered(redis_db, identity):
    return redis_db.zscore("cao:{procs}", identity.id) is not None


def test_a_process_is_registered_before_it_takes_a_slot(redis_db):
    now = [100.0]
    keeper, identity = keeper_with_heartbeat(lambda: now[0])

    keeper.ensure_alive()  # what the engine calls before acquire

    assert registered(redis_db, identity)  # at once, in the caller's thread: no window
    assert keeper.owner == identity.id


def test_the_heartbeat_beats_while_leases_are_held_and_retires_when_idle(redis_db):
    now = [100.0]
    keeper, identity = keeper_with_heartbeat(lambda: now[0])

    lease = keeper.track("svc", "m", 300)
    keeper.tick()
    first = redis_db.zscore("cao:{procs}", identity.id)
    assert first is not None

    now[0] += 1.0
    redis_db.zadd("cao:{procs}", {identity.id: 1})  # make a renewed beat visible
    keeper.tick()
    assert redis_db.zscore("cao:{procs}", identity.id) > 1  # beaten again after one period

    keeper.untrack(lease)
    now[0] += 1.0
    assert keeper.tick() is None  # retired, and nothing left to wake up for
    assert not registered(redis_db, identity)
