"""WebSocket delivery: from an event's commit to a client receiving it, with many jobs running.

    python -m benchmarks.ws_latency --jobs 50

Each job has a subscriber; latency = receive time - the event's ``ts``
(stamped in the transaction that commits it, so it includes the commit).
"""

import argparse
import asyncio
import json
import time
from datetime import datetime

from websockets.asyncio.client import connect

from benchmarks.harness import bench_testbed, summary_ms


async def subscribe(monitor_url, samples):
    async with connect(monitor_url, open_timeout=30, max_queue=None) as socket:
        connected_at = None
        async for raw in socket:
            received = time.time()
            event = json.loads(raw)
            if event["type"] == "WS_CONNECTED":
                connected_at = datetime.fromisoformat(event["ts"]).timestamp()
                continue
            committed = datetime.fromisoformat(event["ts"]).timestamp()
            # Events committed before the subscription come from the replay,
            # not the live push: only live deliveries measure the push path.
            if committed > connected_at:
                samples.append(received - committed)
            if event["type"] in ("JOB_COMPLETED", "JOB_ERROR"):
                return


def measure(bed, *, jobs=50, step_latency="200ms"):
    bed.simulator.configure(latency={"*": step_latency})
    samples = []
    monitor_urls = []
    for _ in range(jobs):
        response = bed.session.post(
            f"{bed.base_url}/api/v1/jobs",
            json={"feature_name": "business_plan", "input_data": {}},
            headers={"X-API-Key": bed.api_key},
            timeout=30,
        )
        response.raise_for_status()
        monitor_urls.append(response.json()["monitor_url"])

    async def all_subscribers():
        await asyncio.wait_for(
            asyncio.gather(*(subscribe(url, samples) for url in monitor_urls)), timeout=300
        )

    asyncio.run(all_subscribers())
    bed.simulator.configure(latency={"*": None})
    return {"jobs": jobs, "live_events": len(samples), "delivery_ms": summary_ms(samples)}


def run(*, jobs=50):
    with bench_testbed() as bed:
        return measure(bed, jobs=jobs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50)
    args = parser.parse_args(argv)
    print(json.dumps(run(jobs=args.jobs), indent=2))


if __name__ == "__main__":
    main()
