"""Engine CPU per step: ``Engine.run_step`` in one thread, with no Dramatiq and no contention.

    python -m benchmarks.engine_cpu --jobs 100
    python -m benchmarks.engine_cpu --jobs 100 --profile            # plus a cProfile (PROFILE_SORT, PROFILE_TOP)
    python -m benchmarks.engine_cpu --app-root /tmp/cao-before      # another checkout's engine

Each business_plan job is created with ``submit_job``, and its four steps are
run one after another by calling ``Engine.run_step`` directly. The messages
the engine sends go to the broker of the benchmark's Redis db and are never
consumed. It prints CPU time (``process_time``) and wall time per step: the
engine's claim, call and record, plus the job creation and one job read per
step that drive it. The simulator answers in 0 ms from its own process.

On a shared, noisy machine this is the steadiest figure for an A/B
comparison of the hot path. Run it alternately on both checkouts, a few
times each, and compare the CPU column.
"""

import argparse
import inspect
import os
import sys
import time
from contextlib import contextmanager

# The project's own top-level packages (what --app-root swaps).
APP_PACKAGES = {
    "api_keys", "cao_project", "common", "jobs", "ops", "orchestration", "services_registry", "simulator", "webhooks",
}


def _configure(app_root):
    """Point this process at the benchmark database and Redis db, and start a simulator."""
    from benchmarks.harness import bench_urls
    from scripts.local_backends import ensure_database

    database_url, redis_url = bench_urls()
    ensure_database(database_url)
    os.environ.update(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        BROKER_URL=redis_url,
        CAO_ENV_FILE="",
        LOG_LEVEL=os.environ.get("LOG_LEVEL", "WARNING"),
        DJANGO_SETTINGS_MODULE="cao_project.settings",
    )
    os.environ.setdefault("SECRET_KEY", "engine-cpu-benchmark-" + "x" * 40)
    from simulator.testing import SimulatorProcess

    simulator = SimulatorProcess(python=sys.executable).start()
    os.environ.update(simulator.env())
    if app_root:
        # Starting the simulator imported some of this checkout's packages;
        # forget them so the engine and everything it uses come from app_root.
        for name in list(sys.modules):
            if name.partition(".")[0] in APP_PACKAGES:
                del sys.modules[name]
        sys.path.insert(0, str(app_root))
        os.chdir(app_root)
    return simulator


@contextmanager
def _profiled(enabled):
    """cProfile the block when ``enabled``; the top functions go to stderr.

    ``PROFILE_SORT`` (default tottime) and ``PROFILE_TOP`` (default 25) choose the listing.
    """
    if not enabled:
        yield
        return
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        stats = pstats.Stats(profiler, stream=sys.stderr).sort_stats(os.environ.get("PROFILE_SORT", "tottime"))
        stats.print_stats(int(os.environ.get("PROFILE_TOP", "25")))


def _run_jobs(engine, count):
    from jobs.models import Job
    from orchestration.commands import submit_job

    # As the step actor calls it; a checkout from before messages named
    # their service (an A/B baseline) takes three arguments.
    named = "service" in inspect.signature(engine.run_step).parameters
    for _ in range(count):
        job, _ = submit_job(feature_name="business_plan", input_data={"business_name": "Acme Labs"})
        for _ in range(job.total_steps):
            job = Job.objects.get(pk=job.pk)
            step = (job.id, job.current_step_index, job.step_token)
            engine.run_step(*step, job.current_service) if named else engine.run_step(*step)


@contextmanager
def benchmark_process(app_root=None, **env):
    """This process set up on the benchmark database (migrated, job tables empty) and Redis db (flushed).

    A simulator runs beside it; ``env`` is added to the environment before
    Django reads its settings.
    """
    simulator = _configure(app_root)
    os.environ.update(env)
    try:
        import django

        django.setup()
        import redis
        from django.conf import settings
        from django.core.management import call_command
        from django.db import connection

        call_command("migrate", verbosity=0)
        redis.Redis.from_url(settings.REDIS_URL).flushdb()
        with connection.cursor() as cursor:
            cursor.execute("TRUNCATE jobs_job, jobs_stepattempt, jobs_jobevent CASCADE")  # and the webhook outbox
        yield
    finally:
        simulator.stop()
        simulator.close()


def timed(run, count, *, unit, profile=False):
    """CPU and wall time of ``run()`` per ``unit`` (``count`` of them), profiled if asked."""
    with _profiled(profile):
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "app_root": os.getcwd(),
        f"{unit}s": count,
        f"cpu_ms_per_{unit}": round(1000 * cpu / count, 2),
        f"wall_ms_per_{unit}": round(1000 * wall / count, 2),
        "profiled": profile,
    }


def measure(*, jobs=100, warmup=5, profile=False, app_root=None):
    with benchmark_process(app_root):
        from orchestration.engine import Engine

        engine = Engine()
        _run_jobs(engine, warmup)
        return timed(lambda: _run_jobs(engine, jobs), jobs * 4, unit="step", profile=profile)


def main(argv=None):
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="cProfile the measured jobs (slows them down)")
    parser.add_argument("--app-root", default=None, help="checkout whose engine to run (default: this one)")
    args = parser.parse_args(argv)
    print(json.dumps(measure(jobs=args.jobs, warmup=args.warmup, profile=args.profile, app_root=args.app_root)))


if __name__ == "__main__":
    main()
