"""Two worker hosts (separate process groups, each with a worker per queue) share the limits."""

import json
import os
import re
import signal
import time

import pytest
import redis

from scripts.testbed import wait_until

# The test's own waits add up to more than pytest.ini's 300 s: the stack's start (60 s), half the
# jobs (120 s), all of them (240 s) and the stop (20 s). Its timeout must let them expire first.
pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(600)]

LIMITS = {"video_gen_v2": 2, "fast_chat_llm": 3, "summarizer_pro": 2, "prompt_enhancer": 4, "email_notifier": 4}


def calls_by_host(bed):
    """How many calls each simulated host's workers started, from their logs."""
    counts = {}
    for name in bed.process_names:
        if "worker_" in name:
            host = name.split("_worker_")[0] if "_worker_" in name else "host1"
            counts[host] = counts.get(host, 0) + len(re.findall(r"Started the call to", bed.log(name)))
    return counts


def holds_a_running_call(bed, process_name, service):
    """Whether the process (or its children) owns a lease of ``service`` whose step PostgreSQL has as RUNNING."""
    client = redis.Redis.from_url(bed.redis_url, decode_responses=True)
    try:
        owners = client.hgetall(f"cao:lim:{{{service}}}:owners")
        infos = client.hgetall("cao:{procs}:info")
    finally:
        client.close()
    group = bed.stack.processes[process_name].pid
    for member, owner in owners.items():
        try:
            if owner not in infos or os.getpgid(json.loads(infos[owner])["pid"]) != group:
                continue
        except ProcessLookupError:
            continue
        job_id, step_index, token = member.rsplit(":", 2)
        running = bed.sql(
            "SELECT 1 FROM jobs_job WHERE id = %s AND current_step_index = %s AND step_token = %s "
            "AND step_state = 'RUNNING'",
            (job_id, int(step_index), int(token)),
        )
        if running:
            return True
    return False


def test_two_worker_hosts_share_every_limit_even_when_one_dies(testbed):
    with testbed(worker_hosts=2) as bed:
        for name, limit in LIMITS.items():
            bed.set_service(name, concurrency_limit=limit, timeout_s=3, lease_ttl_s=4)
        bed.simulator.configure(latency={"*": "60ms~30ms"})

        started = time.monotonic()
        jobs = bed.submit_many(60, "business_plan") + bed.submit_many(60, "viral_video")
        # Halfway, host 2 loses its medium worker (SIGKILL) while it runs a call, and it never comes back.
        wait_until(lambda: bed.statuses(jobs).get("COMPLETED", 0) >= 40, timeout=120, message="half the jobs")
        bed.simulator.configure(latency={"fast_chat_llm": "1500ms", "*": "60ms~30ms"})

        worker = bed.stack.processes["host2_worker_medium"].pid

        def host2_frozen_mid_call():
            # Frozen, the worker can neither finish nor record a call: what it
            # holds now is what it dies with. By now the first jobs may all be
            # past their LLM step: keep new ones coming until it holds one.
            os.killpg(worker, signal.SIGSTOP)
            if holds_a_running_call(bed, "host2_worker_medium", "fast_chat_llm"):
                return True
            os.killpg(worker, signal.SIGCONT)
            jobs.extend(bed.submit_many(2, "business_plan"))
            return False

        wait_until(host2_frozen_mid_call, timeout=60, interval=0.5, message="host 2's medium worker to hold a call")
        bed.kill("host2_worker_medium")
        bed.wait_finished(jobs, timeout=240)
        elapsed = time.monotonic() - started

        stats = bed.simulator.stats()
        for name, limit in LIMITS.items():
            assert stats[name]["max_in_flight"] <= limit, (name, stats[name]["max_in_flight"])
        by_host = calls_by_host(bed)
        assert by_host.get("host1", 0) > 0 and by_host.get("host2", 0) > 0
        # The kill is what the jobs recovered from: the dead worker's call was recorded LOST
        assert bed.sql("SELECT count(*) FROM jobs_stepattempt WHERE outcome = 'LOST'")[0][0] >= 1
        assert "stopped beating" in bed.log("scheduler")
        print(
            f"\n[scaling] two worker hosts: jobs={len(jobs)} seconds={elapsed:.1f} "
            f"calls_started_by_host={by_host} "
            f"max_in_flight={ {name: stats[name]['max_in_flight'] for name in LIMITS} } limits={LIMITS}"
        )
