"""``POST /api/v1/jobs`` latency at fixed request rates (open loop).

    python -m benchmarks.post_latency --rates 10,50 --seconds 10

Request i is due at start + i / rate whatever happened to the others, and its
latency is measured from that due time to the response, so a slow answer
delays nothing else and time spent queued behind it is counted (no
coordinated omission). Clients reuse keep-alive connections, one per
sending thread; requests due in the first ``warmup_s`` (new connections)
are sent but not counted. The jobs created run meanwhile (simulator at
0 ms), as they would in production: the API shares the machine with the
workers. Above the API's capacity the latency grows with the run's length:
``achieved_rate`` (answers per second) then falls short of ``rate``.
"""

import argparse
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from benchmarks.harness import reset, run_case, summary_ms


def measure_rate(bed, *, rate, seconds=10.0, warmup_s=1.0, threads=32, feature="business_plan"):
    local = threading.local()
    sessions = []
    url = f"{bed.base_url}/api/v1/jobs"
    headers = {"X-API-Key": bed.api_key}

    def post(i, due):
        if not hasattr(local, "session"):
            local.session = requests.Session()
            sessions.append(local.session)
        response = local.session.post(
            url, json={"feature_name": feature, "input_data": {"n": i}}, headers=headers, timeout=60
        )
        return due, time.perf_counter(), response.status_code

    warmup = int(rate * warmup_s)
    count = warmup + int(rate * seconds)
    futures = []
    with ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter() + 0.1
        for i in range(count):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(post, i, due))
        results = [future.result() for future in futures[warmup:]]
    for session in sessions:
        session.close()
    answered = [(due, done) for due, done, status in results if status == 201]
    span = max(done for _, done in answered) - min(due for due, _ in answered) if answered else 0
    return {
        "rate": rate,
        "seconds": seconds,
        "requests": len(results),
        "errors": sum(status != 201 for *_, status in results),
        "achieved_rate": round(len(answered) / span, 1) if span else None,
        "latency_ms": summary_ms([done - due for due, done in answered]),
    }


def measure(bed, *, rates=(10, 50), seconds=10.0, warmup_s=1.0):
    """One open-loop run per rate, the jobs of one finished before the next."""
    results = {}
    for i, rate in enumerate(rates):
        if i:
            reset(bed)
        results[f"{rate:g}"] = measure_rate(bed, rate=rate, seconds=seconds, warmup_s=warmup_s)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="10,50", help="requests per second, comma-separated (default 10,50)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long at each rate (default 10)")
    args = parser.parse_args(argv)
    rates = [float(rate) for rate in args.rates.split(",")]
    print(json.dumps(run_case(measure, rates=rates, seconds=args.seconds), indent=2))


if __name__ == "__main__":
    main()
