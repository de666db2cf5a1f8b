"""API CPU per ``POST /api/v1/jobs``: Django's whole request path in one thread, with no HTTP server.

    python -m benchmarks.api_cpu --requests 500
    python -m benchmarks.api_cpu --requests 500 --profile           # plus a cProfile, top functions
    python -m benchmarks.api_cpu --app-root /tmp/cao-before         # another checkout's API

Each request goes through Django's test client: every middleware, the API
key's authentication, the throttles, the serializer, the job's insert and
the first step's message (to the benchmark's Redis db, never consumed). It
prints CPU time (``process_time``) and wall time per request. What it leaves
out is the ASGI server and its thread hop (uvicorn, a2wsgi), which the
``post`` case of ``make bench`` includes. Like ``engine_cpu``, it is the
steady figure for an A/B comparison of the intake path on a noisy machine.
"""

import argparse
import json
import sys

from benchmarks.engine_cpu import benchmark_process, timed


def measure(*, requests=500, warmup=20, profile=False, app_root=None):
    # The throttles stay on the path, at rates this loop never reaches.
    rates = {"CAO_THROTTLE_RATE": "1000000/min", "CAO_JOB_CREATE_THROTTLE_RATE": "1000000/min"}
    with benchmark_process(app_root, **rates):
        from django.test import Client

        from api_keys.models import ApiKey

        _, raw_key = ApiKey.objects.create_key(name="api-cpu benchmark")
        client = Client(headers={"X-API-Key": raw_key}, SERVER_NAME="localhost")

        def post(count, offset):
            for i in range(count):
                response = client.post(
                    "/api/v1/jobs",
                    {"feature_name": "business_plan", "input_data": {"n": offset + i}},
                    content_type="application/json",
                )
                if response.status_code != 201:
                    raise SystemExit(f"POST answered {response.status_code}: {response.content[:200]!r}")

        post(warmup, 0)
        return timed(lambda: post(requests, warmup), requests, unit="request", profile=profile)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--app-root", default=None)
    args = parser.parse_args(argv)
    print(json.dumps(measure(requests=args.requests, profile=args.profile, app_root=args.app_root)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
