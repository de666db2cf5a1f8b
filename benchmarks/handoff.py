"""Slot hand-off in the running stack: a release to the next waiter's STEP_STARTED.

    python -m benchmarks.handoff --jobs 20

``jobs`` viral_video jobs at once, video_gen_v2 at its reference limit of 2
and 200 ms per call (other services 0 ms), so most of its steps park
(WAITING_FOR_SLOT) and get their slot from a release.

Derived from stored event timestamps: for each video_gen_v2 STEP_STARTED of a
job that had a WAITING_FOR_SLOT, the delta to the latest earlier
video_gen_v2 STEP_COMPLETED or JOB_ERROR of any job. Approximations:

- an event's ``ts`` is stamped inside its transaction, before the commit.
  STEP_COMPLETED is stamped at the start of the record, and the slot is
  released after that transaction commits, so the delta includes the
  record's commit and the release; STEP_STARTED is stamped in the claim,
  before its commit.
- "the latest earlier release" is not always the release that handed the
  slot over: with two slots, the other holder may finish in between, and
  then the delta is shorter than the real hand-off. ``fifo_ms`` pairs
  releases with waiters in the limiter's order (the n-th release after a
  step parked goes to the oldest parked step) as a cross-check.
"""


from benchmarks.harness import case_main, events, summary_ms

SERVICE = "video_gen_v2"
RELEASES = ("STEP_COMPLETED", "JOB_ERROR")


def handoff_deltas(all_events, service=SERVICE):
    """(latest-earlier-release deltas, FIFO-paired deltas) in seconds."""
    mine = [e for e in all_events if e.get("step_name") == service]
    releases = sorted(e["ts"] for e in mine if e["type"] in RELEASES)
    parked = {e["job_id"]: e["ts"] for e in mine if e["type"] == "WAITING_FOR_SLOT"}
    starts = {e["job_id"]: e["ts"] for e in mine if e["type"] == "STEP_STARTED" and e["job_id"] in parked}

    latest = []
    for started in starts.values():
        earlier = [ts for ts in releases if ts <= started]
        if earlier:
            latest.append(started - earlier[-1])

    # FIFO: each release goes to the longest-waiting step parked before it.
    line = sorted(parked, key=lambda job_id: parked[job_id])
    fifo = []
    for released in releases:
        waiting = [job_id for job_id in line if parked[job_id] < released]
        if waiting and waiting[0] in starts:
            job_id = waiting[0]
            line.remove(job_id)
            fifo.append(starts[job_id] - released)
    return latest, fifo


def measure(bed, *, jobs=20, step_latency="200ms", limit=2):
    bed.set_service(SERVICE, concurrency_limit=limit)
    bed.simulator.configure(latency={"*": None, SERVICE: step_latency})
    job_ids = bed.submit_many(jobs, "viral_video", threads=8)
    bed.wait_finished(job_ids, timeout=120 + jobs * 2)
    bed.simulator.configure(latency={SERVICE: None})
    latest, fifo = handoff_deltas(events(bed, job_ids))
    return {
        "jobs": jobs,
        "limit": limit,
        "step_latency": step_latency,
        "parked": len(latest),
        "handoff_ms": summary_ms(latest),
        "fifo_ms": summary_ms(fifo),
    }


def main(argv=None):
    case_main(measure, __doc__, argv=argv, jobs=20)


if __name__ == "__main__":
    main()
