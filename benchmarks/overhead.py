"""Per-step orchestration overhead at low load: one business_plan job at a time.

    python -m benchmarks.overhead --jobs 30

Each job is submitted ``pause_s`` after the previous one finished, so every
job meets a quiet stack (workers idle, queues empty). Per job:

    overhead per step = (finished_at - created_at - simulator time) / steps

with simulator time the sum of the steps' ``execution_time_ms`` (what the
simulator measured between receiving the call and answering it), and the
simulator at a small fixed latency so the subtraction is meaningful. The
timestamps are the job row's, stamped by the API and the last record.

Where the time goes, from the event timestamps of each step:
- ``between_steps``: previous STEP_COMPLETED (or the job's created_at) to
  STEP_STARTED: commit, the step message through the broker, the claim;
- ``in_step``: STEP_STARTED to STEP_COMPLETED minus the simulator's time:
  the claim's commit, the HTTP call around the service, the start of the record;
- ``between_steps_p50_by_step``: the first, per step index (0: from created_at).

The pause matters: it measures a step sent to idle workers, the case a
single interactive job meets. Idle consumers do not poll (the broker wakes
them when a message is enqueued, ``orchestration.broker``), so the figure
includes that wake-up rather than a polling back-off.
"""

import time

from benchmarks.harness import case_main, events, summary_ms
from scripts.polling import wait_until

STEPS = 4  # business_plan


def _wait_finished(cursor, job_id, *, timeout=60):
    def finished():
        cursor.execute("SELECT status FROM jobs_job WHERE id = %s", [job_id])
        (status,) = cursor.fetchone()
        return status if status not in ("PENDING", "RUNNING") else None

    return wait_until(finished, timeout=timeout, interval=0.01, message=f"job {job_id} to finish")


def measure(bed, *, jobs=30, warmup=3, step_latency="5ms", pause_s=0.5):
    bed.simulator.configure(latency={"*": step_latency})
    measured = []
    with bed.cursor() as cursor:
        for i in range(warmup + jobs):
            time.sleep(pause_s)
            job_id = bed.submit("business_plan")
            status = _wait_finished(cursor, job_id)
            if status != "COMPLETED":
                raise RuntimeError(f"job {job_id} ended {status}; logs in {bed.log_dir}")
            if i >= warmup:
                measured.append(job_id)
    bed.simulator.configure(latency={"*": None})

    rows = bed.sql(
        "SELECT id::text, EXTRACT(EPOCH FROM created_at), EXTRACT(EPOCH FROM finished_at) "
        "FROM jobs_job WHERE id = ANY(%s::uuid[])",
        [measured],
    )
    jobs_by_id = {job_id: (float(created), float(finished)) for job_id, created, finished in rows}
    by_job = {}
    for event in events(bed, measured):
        by_job.setdefault(event["job_id"], []).append(event)

    per_step, job_latency, simulator_time, between_steps, in_step = [], [], [], [], []
    by_step = {}
    for job_id, (created, finished) in jobs_by_id.items():
        previous = created
        started = None
        sim_s = 0.0
        for event in by_job[job_id]:
            if event["type"] == "STEP_STARTED":
                started = event["ts"]
                between_steps.append(started - previous)
                by_step.setdefault(event["step_index"], []).append(started - previous)
            elif event["type"] == "STEP_COMPLETED":
                step_sim_s = (event.get("execution_time_ms") or 0) / 1000
                sim_s += step_sim_s
                in_step.append(event["ts"] - started - step_sim_s)
                previous = event["ts"]
        job_latency.append(finished - created)
        simulator_time.append(sim_s)
        per_step.append((finished - created - sim_s) / STEPS)
    return {
        "jobs": jobs,
        "step_latency": step_latency,
        "pause_s": pause_s,
        "per_step_overhead_ms": summary_ms(per_step),
        "job_latency_ms": summary_ms(job_latency),
        "simulator_time_ms": summary_ms(simulator_time),
        "between_steps_ms": summary_ms(between_steps),
        "in_step_ms": summary_ms(in_step),
        "between_steps_p50_by_step": {str(index): summary_ms(gaps)["p50"] for index, gaps in sorted(by_step.items())},
    }


def main(argv=None):
    case_main(measure, __doc__, argv=argv, jobs=30)


if __name__ == "__main__":
    main()
