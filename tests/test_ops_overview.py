"""The live overview's JSON and page: figures from real rows and a real limiter, and who may see them."""

import re
import socket
from datetime import timedelta
from datetime import timezone as dt_timezone

import pytest
import redis
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from jobs.models import AttemptOutcome, JobEvent, StepAttempt
from jobs.outcomes import StepDispatch
from ops.overview import overview, service_state
from ops.selectors import call_figures_by_service, jobs_per_minute
from orchestration.broker import NotifyingRedisBroker
from orchestration.dispatch import send_step
from orchestration.limiter import Limiter, Occupancy
from orchestration.per_process import get_limiter
from services_registry.models import Service
from tests.test_ops_admin import claim, completed_job, failed_job, new_job, staff_with

pytestmark = pytest.mark.django_db

PAGE = "/admin/overview/"
DATA = "/admin/overview/data"


@pytest.fixture
def ops_client(client, django_user_model):
    """Staff who may read jobs and see the services: what the overview needs, nothing more."""
    client.force_login(staff_with(django_user_model, "on-call", "view_job", "view_service"))
    return client


def by_name(rows):
    return {row["name"]: row for row in rows}


def closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- Services: the limiter's state ------------------------------------------------


def test_services_show_slots_lines_budgets_cool_downs_and_circuits_from_the_limiter(ops_client, registry):
    limiter = get_limiter()
    # Given fast_chat_llm with two calls in flight under a tokens budget
    Service.objects.filter(name="fast_chat_llm").update(tokens_per_minute=1000)
    for member in ("a:1:1", "b:1:1"):
        assert limiter.acquire(
            "fast_chat_llm", member, limit=15, ttl_s=30, payload="p", tokens_per_minute=1000, token_estimate=100
        ).granted
    # video_gen_v2 full (2 of 2) with one step waiting
    for member in ("c:1:1", "d:1:1", "e:1:1"):
        limiter.acquire("video_gen_v2", member, limit=2, ttl_s=660, payload="p")
    # summarizer_pro's 3 requests a minute spent, a fourth step parked on it
    Service.objects.filter(name="summarizer_pro").update(requests_per_minute=3)
    grants = [
        limiter.acquire("summarizer_pro", f"s{n}:2:1", limit=10, ttl_s=60, payload="p", requests_per_minute=3).granted
        for n in range(4)
    ]
    assert grants == [True, True, True, False]
    # prompt_enhancer cooling down after a 429, email_notifier's circuit open
    limiter.cool_down("prompt_enhancer", seconds=30)
    state, opened, _ = limiter.report_outcome("email_notifier", "f:3:1", ok=False, threshold=1, open_s=60, limit=100)
    assert (state, opened) == ("open", True)

    # When ops poll the overview
    response = ops_client.get(DATA)

    # Then each service says what the limiter holds
    assert response.status_code == 200 and response["Cache-Control"].startswith("max-age=0")
    services = by_name(response.json()["services"])
    llm = services["fast_chat_llm"]
    assert (llm["in_use"], llm["limit"], llm["waiting"], llm["state"]) == (2, 15, 0, "ok")
    assert llm["tokens_per_minute"] == {"used": 200, "limit": 1000}
    assert llm["requests_per_minute"] == {"used": 2, "limit": None}
    video = services["video_gen_v2"]
    assert (video["in_use"], video["limit"], video["waiting"], video["state"]) == (2, 2, 1, "full")
    assert video["state_text"] == "every slot taken, 1 waiting" and video["oldest_wait_s"] >= 0
    summarizer = services["summarizer_pro"]
    assert (summarizer["in_use"], summarizer["waiting"], summarizer["state"]) == (3, 1, "budget-spent")
    assert summarizer["requests_per_minute"] == {"used": 3, "limit": 3}
    assert summarizer["state_text"].startswith("rate budget spent, room in ")
    enhancer = services["prompt_enhancer"]
    assert enhancer["state"] == "cooling" and 25 < enhancer["cooling_down_s"] <= 30
    notifier = services["email_notifier"]
    assert (notifier["state"], notifier["circuit"]) == ("circuit-open", "open") and 50 < notifier["probe_in_s"] <= 60
    assert notifier["state_text"].startswith("circuit open, probe in ")
    assert all(service["limiter"] == "ok" for service in services.values())


def test_a_disabled_service_says_so_and_a_changed_limit_is_read_live(ops_client, registry):
    get_limiter().acquire("summarizer_pro", "a:2:1", limit=10, ttl_s=60, payload="p")
    Service.objects.filter(name="summarizer_pro").update(concurrency_limit=4)
    Service.objects.filter(name="video_gen_v2").update(enabled=False)

    services = by_name(ops_client.get(DATA).json()["services"])

    assert (services["summarizer_pro"]["in_use"], services["summarizer_pro"]["limit"]) == (1, 4)
    assert services["video_gen_v2"]["state"] == "disabled" and services["video_gen_v2"]["enabled"] is False


def occupancy(**fields):
    return Occupancy(now=1000.0, holders=(), granted=(), waiters=(), **fields)


@pytest.mark.parametrize(
    ("occupancy", "enabled", "expected"),
    [
        (None, True, ("unavailable", "the limiter (Redis) cannot be read")),
        (occupancy(circuit="open", probe_at=1003.0), False, ("disabled", "disabled: no new step starts")),
        (occupancy(circuit="open", probe_at=1003.25, cooling_until=1010.0), True,
         ("circuit-open", "circuit open, probe in 3.2 s")),
        (occupancy(circuit="probing", cooling_until=1010.0), True,
         ("probing", "circuit open, one probe call let through")),
        (occupancy(cooling_until=1004.0, rate_frees_at=1002.0), True,
         ("cooling", "cooling down 4.0 s")),
        (occupancy(cooling_until=999.0), True, ("ok", "ok")),
        (occupancy(rate_frees_at=1012.5), True, ("budget-spent", "rate budget spent, room in 12.5 s")),
        (occupancy(rate_frees_at=999.0), True, ("ok", "ok")),
    ],
)
def test_a_services_state_is_the_worst_thing_about_it(occupancy, enabled, expected):
    assert service_state(occupancy, enabled=enabled, limit=2) == expected


def test_a_full_service_is_on_fire_only_when_steps_wait():
    from orchestration.limiter import Holder, Waiter

    holders = (Holder("a", 1030.0), Holder("b", 1030.0))
    full = Occupancy(now=1000.0, holders=holders, granted=(), waiters=())
    waiting = Occupancy(now=1000.0, holders=holders, granted=(), waiters=(Waiter("c", 998.0),))

    assert service_state(full, enabled=True, limit=2) == ("ok", "ok")
    assert service_state(waiting, enabled=True, limit=2) == ("full", "every slot taken, 1 waiting")
    assert service_state(waiting, enabled=True, limit=3) == ("ok", "ok")


def test_redis_down_leaves_the_figures_it_cannot_read_empty_and_says_so(registry):
    port = closed_port()
    unreachable = Limiter(redis.Redis(port=port, socket_connect_timeout=1))
    broker = NotifyingRedisBroker(url=f"redis://127.0.0.1:{port}/0", middleware=[])

    snapshot = overview(limiter=unreachable, broker=broker)

    for service in snapshot["services"]:
        assert service["limiter"] == "unavailable" and service["state"] == "unavailable"
        assert service["in_use"] is None and service["requests_per_minute"] is None
        assert service["calls_5m"] == 0  # PostgreSQL still answers
    assert [(q["name"], q["ready"], q["delayed"]) for q in snapshot["queues"]] == [
        ("heavy", None, None), ("medium", None, None), ("default", None, None), ("webhooks", None, None),
    ]


# --- Services: calls, failures and latency from the attempts ---------------------------


def set_attempts(service, rows):
    """Give ``service``'s finished attempts (oldest first) these (finished, duration_ms, outcome)."""
    attempts = list(StepAttempt.objects.filter(service=service).exclude(outcome=AttemptOutcome.RUNNING).order_by("id"))
    assert len(attempts) >= len(rows), f"{service} has {len(attempts)} finished attempts"
    for attempt, (finished_at, duration_ms, outcome) in zip(attempts, rows):
        StepAttempt.objects.filter(pk=attempt.pk).update(finished_at=finished_at, duration_ms=duration_ms, outcome=outcome)


def test_calls_failures_and_p95_count_the_attempts_that_ended_in_the_last_five_minutes(ops_client, registry):
    now = timezone.now()
    # Given six business plans run through the same step functions the engine uses (24 attempts),
    for _ in range(6):
        completed_job()
    # one failed at summarizer_pro, and one step in flight at prompt_enhancer
    failed_job()
    claim(new_job().pk)
    # with these times and outcomes for fast_chat_llm: one too old to count, one lost with its worker
    recent = now - timedelta(minutes=1)
    set_attempts("fast_chat_llm", [
        (now - timedelta(minutes=6), 9000, AttemptOutcome.SUCCEEDED),
        (recent, 100, AttemptOutcome.SUCCEEDED),
        (recent, 200, AttemptOutcome.SUCCEEDED),
        (recent, 300, AttemptOutcome.FAILED),
        (recent, 400, AttemptOutcome.SUCCEEDED),
        (recent, 500, AttemptOutcome.LOST),
        (recent, 500, AttemptOutcome.SUCCEEDED),
    ])

    services = by_name(ops_client.get(DATA).json()["services"])

    llm = services["fast_chat_llm"]
    assert (llm["calls_5m"], llm["failures_5m"]) == (6, 2)
    # percentile_cont over 100..500: rank 0.95 * 5 = 4.75 between 500 and 500
    assert llm["p95_ms"] == 500.0
    # 7 ended (6 + the failed job's), one more still running
    assert (services["prompt_enhancer"]["calls_5m"], services["prompt_enhancer"]["failures_5m"]) == (7, 0)
    assert (services["summarizer_pro"]["calls_5m"], services["summarizer_pro"]["failures_5m"]) == (7, 1)
    assert (services["video_gen_v2"]["calls_5m"], services["video_gen_v2"]["p95_ms"]) == (0, None)


def test_p95_interpolates_between_the_two_calls_around_it(registry):
    now = timezone.now()
    for _ in range(5):
        completed_job()
    set_attempts("summarizer_pro", [(now, duration, AttemptOutcome.SUCCEEDED) for duration in (10, 20, 30, 40, 90)])

    figures = call_figures_by_service(since=now - timedelta(minutes=5))

    # rank 0.95 * 4 = 3.8: 40 + 0.8 * (90 - 40)
    assert figures["summarizer_pro"].p95_ms == pytest.approx(80.0)
    assert (figures["summarizer_pro"].calls, figures["summarizer_pro"].failures) == (5, 0)


def plan_of(sql):
    with connection.cursor() as cursor:
        # Tiny test tables are read whole; forbid that to see which index the planner can use.
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute("EXPLAIN " + sql)
        return "\n".join(row[0] for row in cursor.fetchall())


def test_the_aggregates_are_one_query_each_read_by_their_index(registry):
    completed_job()
    now = timezone.now()

    with CaptureQueriesContext(connection) as calls:
        call_figures_by_service(since=now - timedelta(minutes=5))
    with CaptureQueriesContext(connection) as jobs:
        jobs_per_minute(now=now, minutes=60)

    [calls_query] = calls.captured_queries
    assert "attempt_finished_idx" in plan_of(calls_query["sql"])
    created_query, ended_query = jobs.captured_queries
    assert "job_recent_idx" in plan_of(created_query["sql"])
    assert "job_event_end_idx" in plan_of(ended_query["sql"])


# --- Queues ---------------------------------------------------------------------------------


def test_queues_count_messages_waiting_and_retries_delayed_per_queue_of_the_registry(ops_client, registry):
    # Given no worker: two first steps sent to the default queue, a retry due in a minute, a medium step
    queued = [new_job(n=n) for n in range(2)]
    for job in queued:
        send_step(StepDispatch(job.pk, 0, job.step_token, "prompt_enhancer"))
    send_step(StepDispatch(queued[0].pk, 0, queued[0].step_token, "prompt_enhancer", delay_s=60))
    send_step(StepDispatch(queued[1].pk, 1, queued[1].step_token, "fast_chat_llm"))

    queues = ops_client.get(DATA).json()["queues"]

    assert queues == [
        {"name": "heavy", "services": ["video_gen_v2"], "ready": 0, "delayed": 0},
        {"name": "medium", "services": ["fast_chat_llm", "summarizer_pro"], "ready": 1, "delayed": 0},
        {"name": "default", "services": ["email_notifier", "prompt_enhancer"], "ready": 2, "delayed": 1},
        {"name": "webhooks", "services": [], "ready": 0, "delayed": 0},  # deliveries, no service
    ]


# --- Jobs over the last hour --------------------------------------------------------------


def move_job(job, *, created, ended=None):
    """Put a real job's creation, and the event that ended its run, at those times."""
    type(job).objects.filter(pk=job.pk).update(created_at=created)
    if ended is not None:
        moved = JobEvent.objects.filter(job=job, type__in=["JOB_COMPLETED", "JOB_ERROR"]).update(created_at=ended)
        assert moved == 1


def test_jobs_per_minute_and_the_failure_rate_cover_the_last_hour(registry):
    now = timezone.now()
    minute = now.astimezone(dt_timezone.utc).replace(second=0, microsecond=0)
    two_ago, ten_ago = minute - timedelta(minutes=2), minute - timedelta(minutes=10)
    # Given, ten minutes ago, two jobs created and one completed;
    move_job(completed_job(), created=ten_ago + timedelta(seconds=5), ended=ten_ago + timedelta(seconds=50))
    move_job(new_job(), created=ten_ago + timedelta(seconds=59))
    # two minutes ago three completed and one failed (created 10 minutes ago);
    for _ in range(3):
        move_job(completed_job(), created=ten_ago, ended=two_ago + timedelta(seconds=1))
    move_job(failed_job(), created=ten_ago, ended=two_ago + timedelta(seconds=59))
    # and one from over an hour ago, which does not count
    move_job(failed_job(), created=minute - timedelta(minutes=61), ended=minute - timedelta(minutes=60, seconds=1))
    # a cancelled job is neither
    from orchestration.commands import cancel_job

    cancelled = new_job()
    cancel_job(job_id=cancelled.pk, is_staff=True)
    move_job(cancelled, created=two_ago)

    jobs = overview(now=now)["jobs"]

    minutes = {m["minute"]: m for m in jobs["minutes"]}
    assert len(jobs["minutes"]) == 60 == len(minutes)
    assert jobs["minutes"][0]["minute"] == (minute - timedelta(minutes=59)).isoformat()
    assert jobs["minutes"][-1]["minute"] == minute.isoformat()
    assert minutes[ten_ago.isoformat()] == {"minute": ten_ago.isoformat(), "created": 6, "completed": 1, "failed": 0}
    assert minutes[two_ago.isoformat()] == {"minute": two_ago.isoformat(), "created": 1, "completed": 3, "failed": 1}
    assert sum(m["completed"] + m["failed"] for m in jobs["minutes"]) == 5
    assert (jobs["created"], jobs["completed"], jobs["failed"], jobs["failure_rate"]) == (7, 4, 1, 0.2)


def test_a_failure_counts_when_it_happened_even_if_the_job_was_resumed_and_completed_since(registry):
    from orchestration.commands import resume_job

    now = timezone.now()
    job = failed_job()
    resume_job(job_id=job.pk, is_staff=True)

    jobs = jobs_per_minute(now=now + timedelta(seconds=1), minutes=60)

    assert sum(m.failed for m in jobs) == 1 and sum(m.completed for m in jobs) == 0


def test_no_job_in_the_hour_has_no_failure_rate(ops_client, registry):
    jobs = ops_client.get(DATA).json()["jobs"]

    assert (jobs["created"], jobs["completed"], jobs["failed"], jobs["failure_rate"]) == (0, 0, 0, None)
    assert all(m["created"] == m["completed"] == m["failed"] == 0 for m in jobs["minutes"])


# --- Who may see it --------------------------------------------------------------------------


def test_anonymous_callers_get_401_in_the_error_shape_and_the_page_sends_them_to_log_in(client, registry):
    response = client.get(DATA)

    assert response.status_code == 401
    assert response.json() == {
        "success": False, "error": {"code": "NOT_AUTHENTICATED", "message": "Log in to the admin first."},
    }
    page = client.get(PAGE)
    assert page.status_code == 302 and page["Location"].startswith("/admin/login/?next=/admin/overview/")


def test_an_api_key_is_not_a_staff_session(client, registry, staff_key):
    response = client.get(DATA, HTTP_X_API_KEY=staff_key.raw_key)

    assert response.status_code == 401 and "services" not in response.json()


@pytest.mark.parametrize(
    "permissions",
    [
        (),
        ("view_service",),  # the registry but no job
        ("view_job",),  # jobs but not the services
        ("change_job", "add_job"),
    ],
)
def test_staff_without_both_read_permissions_are_refused(client, django_user_model, registry, permissions):
    client.force_login(staff_with(django_user_model, "partial", *permissions))

    response = client.get(DATA)

    assert response.status_code == 403 and response.json()["error"]["code"] == "PERMISSION_DENIED"
    assert "services_registry.view_service" in response.json()["error"]["message"]
    assert client.get(PAGE).status_code == 403


def test_users_who_are_not_staff_are_refused_even_with_the_permissions(client, django_user_model, registry):
    user = staff_with(django_user_model, "not-staff", "view_job", "view_service")
    user.is_staff = False
    user.save()
    client.force_login(user)

    assert client.get(DATA).status_code == 403
    page = client.get(PAGE)
    assert page.status_code == 302 and page["Location"].startswith("/admin/login/")


def test_operators_with_change_permissions_may_look(client, django_user_model, registry):
    client.force_login(staff_with(django_user_model, "operator", "change_job", "change_service"))

    assert client.get(DATA).status_code == 200
    assert client.get(PAGE).status_code == 200


def test_the_data_answers_only_get(ops_client, registry):
    response = ops_client.post(DATA)

    assert response.status_code == 405 and response["Allow"] == "GET, HEAD"
    assert response.json()["error"]["code"] == "METHOD_NOT_ALLOWED"


# --- The page and the ways to it --------------------------------------------------------------


def test_the_page_carries_its_first_figures_its_script_and_nothing_from_elsewhere(ops_client, registry):
    get_limiter().acquire("fast_chat_llm", "a:1:1", limit=15, ttl_s=30, payload="p")

    response = ops_client.get(PAGE)

    page = response.content.decode()
    assert response.status_code == 200 and response["Cache-Control"].startswith("max-age=0")
    assert 'data-url="/admin/overview/data"' in page
    # Fresh figures at least every 2 s
    assert 0 < int(re.search(r'data-poll-ms="(\d+)"', page).group(1)) <= 2000
    assert '<script id="ov-initial" type="application/json">' in page
    assert '"name": "fast_chat_llm"' in page and '"in_use": 1' in page
    assert '<script src="/static/ops/overview.js" defer>' in page
    assert 'href="/static/ops/overview.css"' in page
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page
    assert "<title>Live overview |" in page


def test_the_admin_index_and_every_admin_page_link_to_it(ops_client, registry):
    index = ops_client.get("/admin/").content.decode()
    jobs = ops_client.get("/admin/jobs/job/").content.decode()

    assert 'id="cao-overview-entry"' in index and '<a href="/admin/overview/">Live overview</a>' in index
    assert '<a href="/admin/overview/" id="cao-overview-link">Live overview</a>' in jobs
    staff_pages = ops_client.get("/jobs/").content.decode()
    assert '<a href="/admin/overview/">Overview</a>' in staff_pages


def test_staff_who_may_not_open_it_see_no_link(client, django_user_model, registry):
    client.force_login(staff_with(django_user_model, "registry-only", "view_service"))

    index = client.get("/admin/").content.decode()

    assert "/admin/overview/" not in index


def test_the_scripts_and_styles_are_served_by_the_project(ops_client, registry):
    for path in ("/static/ops/overview.js", "/static/ops/overview.css"):
        response = ops_client.get(path)
        assert response.status_code == 200, path
