"""WebSocket delivery: from an event's commit to a client receiving it, with many jobs running.

    python -m benchmarks.ws_latency --jobs 50

The workers are stopped while the jobs are created and one subscriber per
job connects, then started again, so every step event of every job is
delivered live (events committed before a subscription would come from the
replay, which is not the push path). Latency = receive time - the event's
``ts`` (stamped in the transaction that commits it, so it includes the
commit); the subscribers share one asyncio loop in this process.
"""

import asyncio
import json
import time
from datetime import datetime

from websockets.asyncio.client import connect

from benchmarks.harness import case_main, run_case, summary_ms, workers_held


async def _connect(monitor_url):
    socket = await connect(monitor_url, open_timeout=30, max_queue=None)
    hello = json.loads(await socket.recv())
    if hello["type"] != "WS_CONNECTED":
        raise RuntimeError(f"expected WS_CONNECTED, got {hello['type']}")
    return socket, datetime.fromisoformat(hello["ts"]).timestamp()


async def _listen(socket, connected_at, samples):
    async with socket:
        async for raw in socket:
            received = time.time()
            event = json.loads(raw)
            committed = datetime.fromisoformat(event["ts"]).timestamp()
            # Only live deliveries measure the push path, not the replay.
            if committed > connected_at:
                samples.append(received - committed)
            if event["type"] in ("JOB_COMPLETED", "JOB_ERROR"):
                return


def measure(bed, *, jobs=50, step_latency="200ms"):
    bed.simulator.configure(latency={"*": step_latency})
    monitor_urls = []
    with workers_held(bed) as resume_workers:
        for _ in range(jobs):
            response = bed.session.post(
                f"{bed.base_url}/api/v1/jobs",
                json={"feature_name": "business_plan", "input_data": {}},
                headers={"X-API-Key": bed.api_key},
                timeout=30,
            )
            response.raise_for_status()
            monitor_urls.append(response.json()["monitor_url"])

        async def run_subscribers():
            subscriptions = await asyncio.gather(*(_connect(url) for url in monitor_urls))
            resume_workers()
            samples = []
            await asyncio.gather(*(_listen(socket, at, samples) for socket, at in subscriptions))
            return samples

        samples = asyncio.run(asyncio.wait_for(run_subscribers(), timeout=300))
    bed.simulator.configure(latency={"*": None})
    return {"jobs": jobs, "step_latency": step_latency, "live_events": len(samples), "delivery_ms": summary_ms(samples)}


def run(*, jobs=50):
    return run_case(measure, jobs=jobs)


def main(argv=None):
    case_main(measure, __doc__, argv=argv, jobs=50)


if __name__ == "__main__":
    main()
