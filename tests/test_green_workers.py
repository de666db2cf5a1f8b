"""Slots, not threads: green workers keep as many calls in flight as a service's limit allows.

Real processes: the stack's workers run greenlets (common/green.py), a call
in flight holds no OS thread and no database connection, so a limit raised
in the registry applies at once, far above any thread count, while the
stack's PostgreSQL connections stay within a small budget.
"""

import pytest

from scripts.stack import WORKER_POOLS, worker_mode
from scripts.testbed import wait_until
from tests.gate import GatedService

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

# Far above the 16 threads a medium thread worker has.
LIMIT = 60
# API threads (8) + 3 green workers' pools (4 each) + scheduler + recovery, with room.
CONNECTION_BUDGET = 30


def test_a_raised_limit_applies_far_above_the_thread_count_with_few_database_connections(testbed):
    waiting = LIMIT + 15
    with GatedService(hold_limit_s=180) as gate, testbed(env={"FAST_CHAT_LLM_URL": gate.base_url}) as bed:
        assert bed.worker_mode == "green"
        assert LIMIT > WORKER_POOLS["threads"]["medium"][1]
        bed.set_service("fast_chat_llm", concurrency_limit=LIMIT, timeout_s=120, lease_ttl_s=180)
        jobs = bed.submit_many(waiting)

        # Every slot taken, each call held at the gate; the other jobs parked in line.
        gate.wait_in_flight(LIMIT, timeout=90)
        wait_until(
            lambda: bed.sql("SELECT count(*) FROM jobs_job WHERE step_state = 'WAITING'")[0][0] == waiting - LIMIT,
            timeout=60, message="the jobs beyond the limit to park",
        )
        assert gate.in_flight == LIMIT  # never more than the limit
        connections = bed.database_connections()
        gate.open()
        bed.wait_finished(jobs, timeout=120)

        assert connections <= CONNECTION_BUDGET, connections
        # Each step called once: none was lost and run again.
        assert len(gate.calls) == len(set(gate.calls)) == len(jobs)
        print(f"\n[green] calls in flight={LIMIT} (threads would allow {WORKER_POOLS['threads']['medium'][1]}), "
              f"database connections={connections}")


def test_the_worker_mode_is_green_unless_configured_or_on_rabbitmq():
    assert worker_mode({}) == "green"
    assert worker_mode({"BROKER_URL": "redis://127.0.0.1:6379/0"}) == "green"
    assert worker_mode({"BROKER_URL": "amqp://guest:guest@127.0.0.1:5672/"}) == "threads"
    assert worker_mode({"CAO_WORKER_MODE": "threads"}) == "threads"
    with pytest.raises(ValueError, match="CAO_WORKER_MODE"):
        worker_mode({"CAO_WORKER_MODE": "fibers"})
