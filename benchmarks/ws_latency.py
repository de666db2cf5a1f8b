"""WebSocket delivery: from an event's commit to a client receiving it, with many jobs running.

    python -m benchmarks.ws_latency --jobs 50
    python -m benchmarks.ws_latency --burst --jobs 200

``measure`` (the ``ws`` case): the workers are stopped while the jobs are
created and one subscriber per job connects, then started again, so every
step event of every job is delivered live (events committed before a
subscription would come from the replay, which is not the push path).
Latency = receive time - the event's ``ts`` (stamped in the transaction
that commits it, so it includes the commit); the subscribers share one
asyncio loop in this process. ``api_cpu_ms_per_event`` is the CPU of the
API process (it serves the sockets) over that window divided by the events
it delivered: the cost of fan-out, with no other request served meanwhile.

``measure_burst`` (the ``ws_burst`` case): the throughput case's burst (20
clients submit the jobs at once, simulator at 0 ms) with one WebSocket per
job, opened as soon as its POST returns, while the first jobs already run.
Besides the live deliveries' latency: whether every socket received every
seq in order (``gapless_sockets``), and how long after its commit each
socket received the terminal event (``terminal_ms``; ``terminal_within_100ms``
counts the sockets under 100 ms).
"""

import asyncio
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import requests
from websockets.asyncio.client import connect

from benchmarks.cpu import CpuMeter
from benchmarks.harness import case_main, summary_ms, workers_held

TERMINAL_EVENTS = ("JOB_COMPLETED", "JOB_ERROR", "JOB_CANCELLED")
# Clients submitting at once in the burst (the throughput case's).
BURST_CLIENTS = 20


async def _connect(monitor_url):
    socket = await connect(monitor_url, open_timeout=30, max_queue=None)
    hello = json.loads(await socket.recv())
    if hello["type"] != "WS_CONNECTED":
        raise RuntimeError(f"expected WS_CONNECTED, got {hello['type']}")
    return socket, datetime.fromisoformat(hello["ts"]).timestamp()


async def _listen(socket, connected_at, samples):
    """Receive until the terminal event: live latencies go to ``samples``; returns (seqs, terminal lag or None)."""
    seqs, terminal_s = [], None
    async with socket:
        async for raw in socket:
            received = time.time()
            event = json.loads(raw)
            seqs.append(event["seq"])
            committed = datetime.fromisoformat(event["ts"]).timestamp()
            live = committed > connected_at
            # Only live deliveries measure the push path, not the replay.
            if live:
                samples.append(received - committed)
            if event["type"] in TERMINAL_EVENTS:
                terminal_s = received - committed if live else None
                return seqs, terminal_s
    return seqs, terminal_s


def _api_cpu_s(usage):
    return sum(cpu_s for name, cpu_s in usage["processes"].items() if name.startswith("api"))


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
            meter = CpuMeter(bed).start()
            resume_workers()
            samples = []
            followed = await asyncio.gather(*(_listen(socket, at, samples) for socket, at in subscriptions))
            return samples, sum(len(seqs) for seqs, _ in followed), meter.stop()

        samples, delivered, usage = asyncio.run(asyncio.wait_for(run_subscribers(), timeout=300))
    bed.simulator.configure(latency={"*": None})
    return {
        "jobs": jobs,
        "step_latency": step_latency,
        "live_events": len(samples),
        "delivery_ms": summary_ms(samples),
        "delivered_events": delivered,
        "api_cpu_ms_per_event": round(1000 * _api_cpu_s(usage) / max(delivered, 1), 3),
    }


def measure_burst(bed, *, jobs=200, clients=BURST_CLIENTS):
    """The 200-job burst with a WebSocket per job opened as its POST returns; the figures."""
    sessions = [requests.Session() for _ in range(clients)]

    def create(i):
        response = sessions[i % clients].post(
            f"{bed.base_url}/api/v1/jobs",
            json={"feature_name": "business_plan", "input_data": {"n": i}},
            headers={"X-API-Key": bed.api_key},
            timeout=30,
        )
        response.raise_for_status()
        return response.json()["monitor_url"]

    async def run(pool):
        loop = asyncio.get_running_loop()
        samples = []

        async def follow(i):
            socket, connected_at = await _connect(await loop.run_in_executor(pool, create, i))
            return await _listen(socket, connected_at, samples)

        meter = CpuMeter(bed).start()
        followed = await asyncio.gather(*(follow(i) for i in range(jobs)))
        return samples, followed, meter.stop()

    with ThreadPoolExecutor(clients) as pool:
        samples, followed, usage = asyncio.run(asyncio.wait_for(run(pool), timeout=600))
    terminal = [lag for _, lag in followed if lag is not None]
    delivered = sum(len(seqs) for seqs, _ in followed)
    return {
        "jobs": jobs,
        "clients": clients,
        "live_events": len(samples),
        "delivery_ms": summary_ms(samples),
        "gapless_sockets": sum(seqs == list(range(1, len(seqs) + 1)) for seqs, _ in followed),
        "terminal_live": len(terminal),
        "terminal_ms": summary_ms(terminal),
        "terminal_within_100ms": sum(lag <= 0.1 for lag in terminal),
        "delivered_events": delivered,
        "api_cpu_ms_per_event_with_intake": round(1000 * _api_cpu_s(usage) / max(delivered, 1), 3),
    }


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--burst" in argv:
        argv.remove("--burst")
        case_main(measure_burst, __doc__, argv=argv, jobs=200)
    else:
        case_main(measure, __doc__, argv=argv, jobs=50)


if __name__ == "__main__":
    main()
