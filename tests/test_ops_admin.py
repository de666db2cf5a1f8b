"""The ops console: jobs, services and recipes in the Django admin (test client, real stack)."""

import re
import socket
from datetime import timedelta

import pytest
import redis
from django.contrib.admin.models import ADDITION, CHANGE, LogEntry
from django.contrib.auth.models import Permission
from django.db import transaction
from django.utils import timezone

from api_keys.models import ApiKey
from jobs.models import Job, JobEvent, JobStatus
from jobs.outcomes import Failure
from jobs.state import lock_job
from jobs.steps import step_claim, step_fail, step_succeed
from orchestration.commands import cancel_job, submit_job
from orchestration.per_process import get_limiter
from orchestration.limiter import Limiter
from ops.occupancy import read_occupancies
from services_registry.models import Recipe, Service
from services_registry.services import recipe_duplicate

pytestmark = pytest.mark.django_db

JOBS = "/admin/jobs/job/"
SERVICES = "/admin/services_registry/service/"
RECIPES = "/admin/services_registry/recipe/"

BUSY = Failure("RESOURCE_EXHAUSTED", "summarizer_pro is busy (HTTP 503).", True, 503)
REJECTED = Failure("DOWNSTREAM_REJECTED", "summarizer_pro refused the input (HTTP 422).", False, 422)


# --- Users ------------------------------------------------------------------


@pytest.fixture
def superuser(client, django_user_model):
    user = django_user_model.objects.create_superuser("root", "root@example.com", "pw")
    client.force_login(user)
    return client


def staff_with(django_user_model, username, *codenames):
    user = django_user_model.objects.create_user(username, password="pw", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    return user


@pytest.fixture
def viewer(client, django_user_model):
    """Staff who may look at everything and change nothing."""
    client.force_login(
        staff_with(django_user_model, "viewer", "view_job", "view_service", "view_recipe")
    )
    return client


@pytest.fixture
def operator(client, django_user_model):
    """Staff who may operate jobs (jobs.change_job) but not edit the registry."""
    client.force_login(staff_with(django_user_model, "operator", "change_job", "view_service"))
    return client


# --- Jobs, driven through the same services the engine uses ------------------


def new_job(feature="business_plan", owner=None, **input_data):
    job, _ = submit_job(feature_name=feature, input_data=input_data or {"topic": "tea"}, owner=owner)
    return job


def claim(job_id):
    with transaction.atomic():
        job = lock_job(job_id)
        step_claim(job=job, max_attempts=5)
    return job


def succeed(job_id):
    claim(job_id)
    with transaction.atomic():
        job = lock_job(job_id)
        step_succeed(job=job, token=job.step_token, data={"text": "ok"}, metrics={"execution_time_ms": 12})


def fail_at_step_3(job_id, failure=BUSY):
    """Steps 1 and 2 succeed, step 3 (summarizer_pro) fails the job."""
    succeed(job_id)
    succeed(job_id)
    claim(job_id)
    with transaction.atomic():
        job = lock_job(job_id)
        step_fail(job=job, token=job.step_token, failure=failure, retry_delay_s=None)
    return Job.objects.get(pk=job_id)


def failed_job(failure=BUSY, **kwargs):
    return fail_at_step_3(new_job(**kwargs).pk, failure)


def completed_job():
    job = new_job()
    for _ in range(4):
        succeed(job.pk)
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED
    return job


def listed(response):
    return [obj.pk for obj in response.context["cl"].result_list]


def messages_of(response):
    return [str(message) for message in response.context["messages"]]


def event_types(job):
    return list(JobEvent.objects.filter(job=job).order_by("seq").values_list("type", flat=True))


def log_messages(job):
    return list(
        LogEntry.objects.filter(object_id=str(job.pk), action_flag=CHANGE)
        .order_by("id")
        .values_list("change_message", flat=True)
    )


# --- Job list -----------------------------------------------------------------


def test_job_list_shows_progress_current_step_error_and_owner(superuser, registry):
    owner, _ = ApiKey.objects.create_key(name="billing-service")
    failed = failed_job(owner=owner)
    pending = new_job(feature="viral_video")

    response = superuser.get(JOBS)

    page = response.content.decode()
    for header in ("Id", "Feature name", "Status", "Progress", "Current step", "Age", "Error code", "Retryable"):
        assert f">{header}<" in page or f">{header}</a>" in page, header
    failed_row = next(row for row in page.split("<tr") if str(failed.pk) in row)
    assert f'<code title="{failed.pk}">{str(failed.pk)[:8]}…</code>' in failed_row
    assert 'class="cao-badge cao-status-failed">FAILED' in failed_row
    assert "step 3 of 4" in failed_row and "summarizer_pro" in failed_row
    assert "RESOURCE_EXHAUSTED" in failed_row and ">yes<" in failed_row
    assert "billing-service" in failed_row
    pending_row = next(row for row in page.split("<tr") if str(pending.pk) in row)
    assert 'cao-status-pending">PENDING' in pending_row
    assert "step 1 of 3" in pending_row and "prompt_enhancer (queued)" in pending_row


def test_job_list_loads_owners_without_a_query_per_row(superuser, registry, django_assert_max_num_queries):
    owner, _ = ApiKey.objects.create_key(name="bulk")
    for _ in range(3):
        new_job(owner=owner)
    superuser.get(JOBS)  # warm up: sessions, content types

    with django_assert_max_num_queries(12) as few:
        superuser.get(JOBS)
    for _ in range(12):
        new_job(owner=ApiKey.objects.create_key(name="other")[0])
    with django_assert_max_num_queries(len(few.captured_queries)):
        superuser.get(JOBS)


def test_job_list_filters_by_status_feature_retryable_and_created_date(superuser, registry):
    busy = failed_job()
    rejected = failed_job(failure=REJECTED)
    video = new_job(feature="viral_video")
    old = new_job()
    # Every date below derives from one reading of the clock, so the test means the same at 23:59:59.
    today = timezone.localtime().replace(hour=0, minute=0, second=0, microsecond=0)
    Job.objects.filter(pk__in=[busy.pk, rejected.pk, video.pk]).update(created_at=today + timedelta(hours=12))
    Job.objects.filter(pk=old.pk).update(created_at=today - timedelta(days=3))

    assert set(listed(superuser.get(JOBS, {"status__exact": "FAILED"}))) == {busy.pk, rejected.pk}
    assert listed(superuser.get(JOBS, {"feature_name": "viral_video"})) == [video.pk]
    assert listed(superuser.get(JOBS, {"status__exact": "FAILED", "retryable__exact": "0"})) == [rejected.pk]
    assert listed(superuser.get(JOBS, {"retryable__exact": "1"})) == [busy.pk]
    # What the filter's "Today" link sends.
    recent = listed(superuser.get(JOBS, {"created_at__gte": str(today), "created_at__lt": str(today + timedelta(days=1))}))
    assert old.pk not in recent and set(recent) == {busy.pk, rejected.pk, video.pk}


def test_job_list_searches_by_id_error_code_and_owner(superuser, registry):
    owner, _ = ApiKey.objects.create_key(name="billing-service")
    mine = failed_job(owner=owner)
    rejected = failed_job(failure=REJECTED)
    new_job()

    assert listed(superuser.get(JOBS, {"q": str(mine.pk)})) == [mine.pk]
    assert listed(superuser.get(JOBS, {"q": str(mine.pk)[:8]})) == [mine.pk]
    assert listed(superuser.get(JOBS, {"q": "downstream_rejected"})) == [rejected.pk]
    assert listed(superuser.get(JOBS, {"q": "billing"})) == [mine.pk]
    assert listed(superuser.get(JOBS, {"q": owner.prefix})) == [mine.pk]


# --- Job detail -------------------------------------------------------------


def test_job_detail_shows_context_json_steps_attempts_and_events(superuser, registry):
    job = failed_job(topic="green tea")

    page = superuser.get(f"{JOBS}{job.pk}/change/").content.decode()

    # The context, pretty-printed and escaped.
    assert '<pre class="cao-json">{\n  &quot;initial_input&quot;: {\n    &quot;topic&quot;: &quot;green tea&quot;' in page
    assert "&quot;step_1_fast_chat_llm&quot;" in page
    # The step timeline.
    assert re.search(r"<td>3</td><td>summarizer_pro</td><td><span class=\"cao-badge cao-state-failed\">failed", page)
    # Attempts inline: service, attempt, outcome, duration, error.
    assert "Step attempts" in page
    assert 'cao-status-succeeded">SUCCEEDED' in page and 'cao-status-failed">FAILED' in page
    assert "RESOURCE_EXHAUSTED (HTTP 503): summarizer_pro is busy (HTTP 503)." in page
    assert re.search(r"\d+ ms", page)
    # The event log inline.
    assert "Event log" in page
    for event_type in ("STEP_STARTED", "STEP_COMPLETED", "JOB_ERROR"):
        assert re.search(rf'class="field-event_type">\s*<p>{event_type}</p>', page), event_type
    assert "Calling summarizer_pro (attempt 1 of 5)." in page
    # Read-only: no save buttons, no inputs for the job's fields.
    assert 'name="_save"' not in page and 'name="status"' not in page
    # The buttons that apply to a retryable failure.
    assert 'id="cao-op-resume"' in page and 'id="cao-op-cancel"' in page
    assert 'id="cao-op-force-resume"' not in page


def test_job_detail_offers_force_resume_only_for_non_retryable_failures(superuser, registry):
    rejected = failed_job(failure=REJECTED)
    running = new_job()
    done = completed_job()

    page = superuser.get(f"{JOBS}{rejected.pk}/change/").content.decode()
    assert 'id="cao-op-resume"' in page and 'id="cao-op-force-resume"' in page
    page = superuser.get(f"{JOBS}{running.pk}/change/").content.decode()
    assert 'id="cao-op-cancel"' in page and 'id="cao-op-resume"' not in page
    page = superuser.get(f"{JOBS}{done.pk}/change/").content.decode()
    assert "cao-op-" not in page


# --- Job actions: one job ---------------------------------------------------


def test_resume_button_resumes_writes_the_event_and_logs_it(superuser, registry):
    job = failed_job()

    response = superuser.post(f"{JOBS}{job.pk}/operate/resume/", follow=True)

    assert response.redirect_chain[-1][0] == f"{JOBS}{job.pk}/change/"
    job.refresh_from_db()
    assert (job.status, job.current_step_index, job.error_code) == (JobStatus.RUNNING, 2, "")
    assert event_types(job)[-1] == "JOB_RESUMED"
    assert log_messages(job) == ["Resumed from step 3 of 4 (was FAILED)."]
    assert messages_of(response) == [f"Job {job.pk}: Resumed from step 3 of 4 (was FAILED)."]


def test_force_resume_button_resumes_a_non_retryable_failure(superuser, registry):
    job = failed_job(failure=REJECTED)

    response = superuser.post(f"{JOBS}{job.pk}/operate/force-resume/", follow=True)

    job.refresh_from_db()
    assert job.status == JobStatus.RUNNING
    resumed = JobEvent.objects.filter(job=job).order_by("seq").last().payload
    assert resumed["type"] == "JOB_RESUMED" and resumed["forced"] is True
    assert log_messages(job) == ["Force-resumed from step 3 of 4 (was FAILED)."]
    assert messages_of(response) == [f"Job {job.pk}: Force-resumed from step 3 of 4 (was FAILED)."]


def test_cancel_button_cancels_and_logs_it(superuser, registry):
    job = new_job()

    response = superuser.post(f"{JOBS}{job.pk}/operate/cancel/", follow=True)

    job.refresh_from_db()
    assert job.status == JobStatus.CANCELLED and job.finished_at is not None
    assert event_types(job) == ["JOB_CANCELLED"]
    assert log_messages(job) == ["Cancelled (was PENDING)."]
    assert messages_of(response) == [f"Job {job.pk}: Cancelled (was PENDING)."]


@pytest.mark.parametrize(
    "make, operation, message",
    [
        (completed_job, "resume", "was not resumed: The job is COMPLETED; only FAILED jobs can be resumed."),
        (lambda: failed_job(failure=REJECTED), "resume",
         "was not resumed: The job failed with a non-retryable error (DOWNSTREAM_REJECTED); fix the cause, "
         "then resume with force (staff only)."),
        (new_job, "force-resume", "was not force-resumed: The job is PENDING; only FAILED jobs can be resumed."),
        (lambda: cancel_job(job_id=new_job().pk, is_staff=True).job, "cancel",
         "was not cancelled: The job is already CANCELLED."),
    ],
)
def test_refused_operations_say_why_and_change_nothing(superuser, registry, make, operation, message):
    job = make()
    before = (job.status, event_types(job))

    response = superuser.post(f"{JOBS}{job.pk}/operate/{operation}/", follow=True)

    assert messages_of(response) == [f"Job {job.pk} {message}"]
    job.refresh_from_db()
    assert (job.status, event_types(job)) == before
    assert log_messages(job) == []


def test_buttons_bring_ops_back_to_the_job_with_the_list_filters_kept(superuser, registry):
    job = failed_job()
    filters = "_changelist_filters=status__exact%3DFAILED"

    page = superuser.get(f"{JOBS}{job.pk}/change/?{filters}").content.decode()
    response = superuser.post(f"{JOBS}{job.pk}/operate/resume/?{filters}")

    assert f'action="{JOBS}{job.pk}/operate/resume/?{filters}"' in page
    assert response.status_code == 302 and response["Location"] == f"{JOBS}{job.pk}/change/?{filters}"


def test_operations_answer_only_post_and_known_names(superuser, registry):
    job = failed_job()

    assert superuser.get(f"{JOBS}{job.pk}/operate/resume/").status_code == 405
    assert superuser.post(f"{JOBS}{job.pk}/operate/explode/").status_code == 404
    assert Job.objects.get(pk=job.pk).status == JobStatus.FAILED


# --- Job actions: in bulk ---------------------------------------------------


def bulk(client, action, jobs):
    return client.post(
        JOBS, {"action": action, "_selected_action": [str(job.pk) for job in jobs], "index": 0}, follow=True
    )


def test_bulk_resume_resumes_the_failed_ones_and_explains_the_rest(superuser, registry):
    first, second = failed_job(), failed_job()
    rejected, done = failed_job(failure=REJECTED), completed_job()

    response = bulk(superuser, "resume_selected", [first, second, rejected, done])

    for job in (first, second):
        job.refresh_from_db()
        assert job.status == JobStatus.RUNNING and event_types(job)[-1] == "JOB_RESUMED"
        assert log_messages(job) == ["Resumed from step 3 of 4 (was FAILED)."]
    assert Job.objects.get(pk=rejected.pk).status == JobStatus.FAILED and log_messages(rejected) == []
    assert Job.objects.get(pk=done.pk).status == JobStatus.COMPLETED
    shown = messages_of(response)
    assert "Resumed 2 jobs." in shown
    assert f"Job {rejected.pk} was not resumed: The job failed with a non-retryable error (DOWNSTREAM_REJECTED); " \
        "fix the cause, then resume with force (staff only)." in shown
    assert f"Job {done.pk} was not resumed: The job is COMPLETED; only FAILED jobs can be resumed." in shown
    assert len(shown) == 3


def test_bulk_force_resume_and_bulk_cancel(superuser, registry):
    rejected, busy = failed_job(failure=REJECTED), failed_job()

    response = bulk(superuser, "force_resume_selected", [rejected, busy])

    assert messages_of(response) == ["Force-resumed 2 jobs."]
    assert set(Job.objects.filter(pk__in=[rejected.pk, busy.pk]).values_list("status", flat=True)) == {"RUNNING"}

    pending = new_job()
    response = bulk(superuser, "cancel_selected", [rejected, busy, pending])

    assert messages_of(response) == ["Cancelled 3 jobs."]
    for job in (rejected, busy, pending):
        assert Job.objects.get(pk=job.pk).status == JobStatus.CANCELLED
        assert event_types(job)[-1] == "JOB_CANCELLED"
        assert log_messages(job)[-1].startswith("Cancelled (was ")


# --- Permissions ------------------------------------------------------------


def test_non_staff_users_are_sent_to_the_login_page(client, django_user_model, registry):
    client.force_login(django_user_model.objects.create_user("someone", password="pw"))

    for url in ("/admin/", JOBS, SERVICES, RECIPES):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/admin/login/")


def test_jobs_cannot_be_added_edited_or_deleted_even_by_a_superuser(superuser, registry):
    job = failed_job()

    assert superuser.get(f"{JOBS}add/").status_code == 403
    assert superuser.post(f"{JOBS}{job.pk}/change/", {"status": "COMPLETED"}).status_code == 403
    assert superuser.post(f"{JOBS}{job.pk}/delete/", {"post": "yes"}).status_code == 403
    assert "delete_selected" not in superuser.get(JOBS).content.decode()
    assert Job.objects.get(pk=job.pk).status == JobStatus.FAILED


def test_staff_without_change_job_can_look_but_not_operate(viewer, registry):
    job = failed_job()

    page = viewer.get(JOBS).content.decode()
    assert str(job.pk) in page and "resume_selected" not in page
    detail = viewer.get(f"{JOBS}{job.pk}/change/").content.decode()
    assert "Event log" in detail and "cao-op-" not in detail

    assert viewer.post(f"{JOBS}{job.pk}/operate/resume/").status_code == 403
    bulk(viewer, "resume_selected", [job])
    assert Job.objects.get(pk=job.pk).status == JobStatus.FAILED
    assert log_messages(job) == []


def test_staff_without_job_permissions_see_no_job_nor_its_context(client, django_user_model, registry):
    job = failed_job(topic="confidential")
    client.force_login(staff_with(django_user_model, "nobody"))

    assert client.get(JOBS).status_code == 403
    detail = client.get(f"{JOBS}{job.pk}/change/")
    assert detail.status_code == 403 and "confidential" not in detail.content.decode()
    assert client.post(f"{JOBS}{job.pk}/operate/force-resume/").status_code == 403
    assert Job.objects.get(pk=job.pk).status == JobStatus.FAILED


def test_staff_with_change_job_can_operate_but_not_edit_services(operator, registry):
    job = failed_job()

    response = operator.post(f"{JOBS}{job.pk}/operate/resume/")

    assert response.status_code == 302 and Job.objects.get(pk=job.pk).status == JobStatus.RUNNING
    llm = registry["fast_chat_llm"]
    assert operator.post(f"{SERVICES}{llm.pk}/change/", {"concurrency_limit": 1}).status_code == 403
    assert Service.objects.get(pk=llm.pk).concurrency_limit == 15
    assert operator.get(RECIPES).status_code == 403


def test_viewer_cannot_edit_services_or_duplicate_recipes(viewer, registry):
    llm = registry["fast_chat_llm"]

    assert viewer.post(f"{SERVICES}{llm.pk}/change/", {"concurrency_limit": 1}).status_code == 403
    assert Service.objects.get(pk=llm.pk).concurrency_limit == 15
    plan = Recipe.objects.get(name="business_plan")
    viewer.post(RECIPES, {"action": "duplicate", "_selected_action": [plan.pk], "index": 0})
    assert not Recipe.objects.filter(name__startswith="business_plan_copy").exists()


# --- Services: occupancy and health ------------------------------------------


def service_row(page, name):
    return next(row for row in page.split("<tr") if f">{name}</a>" in row)


def test_service_list_shows_live_occupancy_from_the_limiter(superuser, registry):
    limiter = get_limiter()
    for member in ("a", "b"):
        assert limiter.acquire("fast_chat_llm", member, limit=15, ttl_s=30, payload="p").granted
    for member in ("c", "d", "e"):
        limiter.acquire("video_gen_v2", member, limit=2, ttl_s=30, payload="p")

    page = superuser.get(SERVICES).content.decode()

    assert '<span class="cao-occupancy">in use 2 / 15</span> <span class="cao-waiting">· 0 waiting</span>' in service_row(page, "fast_chat_llm")
    video = service_row(page, "video_gen_v2")
    assert '<span class="cao-occupancy cao-full">in use 2 / 2</span> <span class="cao-waiting">· 1 waiting (oldest ' in video
    assert re.search(r"oldest \d+\.\d s\)", video)
    assert 'in use 0 / 100</span> <span class="cao-waiting">· 0 waiting' in service_row(page, "email_notifier")


def test_service_detail_shows_occupancy_and_follows_a_new_limit(superuser, registry):
    summarizer = registry["summarizer_pro"]
    get_limiter().acquire("summarizer_pro", "a", limit=10, ttl_s=60, payload="p")
    Service.objects.filter(pk=summarizer.pk).update(concurrency_limit=4)

    page = superuser.get(f"{SERVICES}{summarizer.pk}/change/").content.decode()

    assert 'in use 1 / 4</span> <span class="cao-waiting">· 0 waiting' in page
    assert 'id="cao-check-health"' in page


def test_occupancy_says_unavailable_when_redis_is_down(superuser, registry, monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    unreachable = Limiter(redis.Redis(port=closed_port, socket_connect_timeout=1))
    assert set(read_occupancies(registry.values(), limiter=unreachable).values()) == {None}
    monkeypatch.setattr("ops.occupancy.get_limiter", lambda: unreachable)

    response = superuser.get(SERVICES)

    assert response.status_code == 200
    assert response.content.decode().count(">unavailable</span>") == len(registry)


def test_health_action_reports_every_service_with_status_and_latency(superuser, registry, simulator):
    simulator.configure(health_fail={"summarizer_pro": "503"})
    services = Service.objects.filter(name__in=["fast_chat_llm", "summarizer_pro"])

    response = superuser.post(
        SERVICES, {"action": "check_health", "_selected_action": [s.pk for s in services], "index": 0}, follow=True
    )

    shown = {str(message).split(":")[0]: (message, message.level_tag) for message in response.context["messages"]}
    ok, level = shown["Health of fast_chat_llm"]
    assert level == "success"
    assert re.fullmatch(
        rf"Health of fast_chat_llm: ok, HTTP 200 from {simulator.base_url('fast_chat_llm')}/health in [\d.]+ ms\.",
        str(ok),
    )
    bad, level = shown["Health of summarizer_pro"]
    assert level == "error" and str(bad).startswith("Health of summarizer_pro: unhealthy, HTTP 503 from ")


def test_health_button_reports_a_connection_failure(superuser, registry, settings):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    settings.CAO_SERVICE_URL_OVERRIDES = {"email_notifier": f"http://127.0.0.1:{closed_port}"}
    notifier = registry["email_notifier"]

    response = superuser.post(f"{SERVICES}{notifier.pk}/check-health/", follow=True)

    assert response.redirect_chain[-1][0] == f"{SERVICES}{notifier.pk}/change/"
    [message] = response.context["messages"]
    assert message.level_tag == "error"
    assert re.fullmatch(
        rf"Health of email_notifier: connection failed: .+ \(http://127.0.0.1:{closed_port}/health, [\d.]+ ms\)\.", str(message)
    )


def test_viewer_may_run_the_health_check(viewer, registry, simulator):
    notifier = registry["email_notifier"]

    response = viewer.post(f"{SERVICES}{notifier.pk}/check-health/", follow=True)

    assert [m.level_tag for m in response.context["messages"]] == ["success"]


# --- Recipes: duplicate, running jobs ---------------------------------------


def test_duplicate_copies_steps_under_a_new_disabled_name(superuser, registry):
    plan = Recipe.objects.get(name="business_plan")

    for _ in range(2):
        response = superuser.post(
            RECIPES, {"action": "duplicate", "_selected_action": [plan.pk], "index": 0}, follow=True
        )

    copies = Recipe.objects.filter(name__startswith="business_plan_").order_by("name")
    assert [c.name for c in copies] == ["business_plan_copy", "business_plan_copy2"]
    for copy in copies:
        assert copy.enabled is False and copy.description == plan.description
        assert [s.service.name for s in copy.steps.order_by("position")] == [
            "prompt_enhancer", "fast_chat_llm", "summarizer_pro", "email_notifier",
        ]
        assert LogEntry.objects.get(object_id=str(copy.pk), action_flag=ADDITION).change_message == (
            "Duplicated from business_plan."
        )
    assert "Duplicated business_plan as" in messages_of(response)[0]
    assert "business_plan_copy2</a>, disabled: enable it when it is ready." in messages_of(response)[0]
    assert plan.steps.count() == 4


def test_duplicate_keeps_long_names_within_the_limit(registry):
    long = Recipe.objects.create(name="x" * 64, enabled=False)

    first, second = recipe_duplicate(recipe=long), recipe_duplicate(recipe=long)

    assert (first.name, second.name) == ("x" * 59 + "_copy", "x" * 58 + "_copy2")


def test_recipe_list_counts_pending_and_running_jobs(superuser, registry):
    new_job(), new_job()
    claim(new_job().pk)  # RUNNING
    failed_job()
    completed_job()
    new_job(feature="viral_video")

    response = superuser.get(RECIPES)

    counts = {recipe.name: recipe.active_job_count for recipe in response.context["cl"].result_list}
    assert counts == {"business_plan": 3, "viral_video": 1}
    assert "Jobs running" in response.content.decode()
    ordered = superuser.get(RECIPES, {"o": "4"})  # by jobs running, ascending
    assert [r.name for r in ordered.context["cl"].result_list] == ["viral_video", "business_plan"]


# --- Dashboard ----------------------------------------------------------------


def test_admin_index_counts_jobs_by_status_over_the_last_24_hours(superuser, registry):
    new_job(), new_job()
    claim(new_job().pk)
    failed_job()
    completed_job()
    cancel_job(job_id=new_job().pk, is_staff=True)
    old = failed_job()
    Job.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(hours=25))

    page = superuser.get("/admin/").content.decode()

    counts = dict(re.findall(r'data-status="(\w+)">\w+ <strong>(\d+)</strong>', page))
    assert counts == {"PENDING": "2", "RUNNING": "1", "COMPLETED": "1", "FAILED": "1", "CANCELLED": "1"}
    assert "Jobs created in the last 24 h: 6" in page
    # Each count leads to the same jobs in the list.
    link = re.search(r'href="([^"]+)"\s+data-status="FAILED"', page).group(1).replace("&amp;", "&")
    response = superuser.get(link)
    assert response.status_code == 200 and len(listed(response)) == 1 and old.pk not in listed(response)
    # The stock index is still there.
    assert "Recent actions" in page and "Services" in page


def test_dashboard_is_hidden_from_staff_who_cannot_see_jobs(client, django_user_model, registry):
    client.force_login(staff_with(django_user_model, "registry-only", "view_service"))

    page = client.get("/admin/").content.decode()

    assert "cao-jobs-24h" not in page
