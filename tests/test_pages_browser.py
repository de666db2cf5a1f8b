"""The job pages in headless Chromium, against the real stack in-process.

Waits use selectors, not wait_for_function: the pages' Content-Security-Policy
forbids the eval that wait_for_function relies on, as it should.
"""

import re

import pytest

from jobs.models import Job, JobStatus
from tests.browser import *  # noqa: F401,F403 (chromium, page, login)
from tests.browser import login

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture
def staff_user(make_staff):
    return make_staff("ops", "jobs.view_job", "jobs.change_job", "jobs.add_job", password="ops-password")


def steps_states(page):
    return page.eval_on_selector_all(".step", "rows => rows.map(r => r.dataset.state)")


def event_seqs(page):
    return page.eval_on_selector_all("#events li", "items => items.map(i => Number(i.dataset.seq))")


def test_start_a_job_and_watch_every_step_turn_done(page, asgi_server, worker, simulator, registry, staff_user):
    simulator.configure(latency={"*": "150ms"})
    login(page, asgi_server.base_url, "ops", "ops-password")

    page.goto(f"{asgi_server.base_url}/jobs/")
    page.select_option("#new-job-feature", "business_plan")
    page.fill("#new-job-input", '{"business_name": "Browser Co"}')
    page.click("#new-job-submit")

    page.wait_for_url(re.compile(r".*/jobs/[0-9a-f-]{36}/$"))
    page.wait_for_selector('#connection:text-is("live")')
    page.wait_for_selector('#job-status:text-is("COMPLETED")', timeout=30_000)
    assert steps_states(page) == ["done"] * 4
    seqs = event_seqs(page)
    assert seqs == list(range(1, len(seqs) + 1))
    job = Job.objects.get(pk=page.url.rstrip("/").split("/")[-1])
    assert job.status == JobStatus.COMPLETED and job.context["initial_input"] == {"business_name": "Browser Co"}


def test_a_dropped_socket_recovers_without_missing_a_step(page, asgi_server, worker, simulator, registry, staff_user):
    from orchestration.dispatch import submit_job

    simulator.configure(latency={"fast_chat_llm": "1200ms", "*": "100ms"})
    login(page, asgi_server.base_url, "ops", "ops-password")
    job, _ = submit_job(feature_name="business_plan", input_data={})
    page.goto(f"{asgi_server.base_url}/jobs/{job.pk}/")

    # While step 2 runs, the connection drops; events keep being committed meanwhile.
    page.wait_for_selector('.step[data-index="1"][data-state="running"]', timeout=20_000)
    page.evaluate("window.caoSocket.close()")
    page.wait_for_selector('#connection:not(:text-is("live"))')

    page.wait_for_selector('#job-status:text-is("COMPLETED")', timeout=30_000)
    page.wait_for_selector('#connection:text-is("live")')
    assert steps_states(page) == ["done"] * 4
    seqs = event_seqs(page)
    assert seqs == list(range(1, Job.objects.get(pk=job.pk).last_event_seq + 1))


def test_resume_a_failed_job_from_its_page(page, asgi_server, worker, simulator, registry, staff_user, fast_retries):
    from services_registry.models import Service

    Service.objects.filter(name="summarizer_pro").update(max_attempts=1)
    simulator.configure(fail={"summarizer_pro": "503"})
    login(page, asgi_server.base_url, "ops", "ops-password")
    from orchestration.dispatch import submit_job

    job, _ = submit_job(feature_name="business_plan", input_data={})
    page.goto(f"{asgi_server.base_url}/jobs/{job.pk}/")
    page.wait_for_selector("#error-box:not([hidden])", timeout=20_000)
    assert page.inner_text("#error-code") == "RESOURCE_EXHAUSTED"
    assert page.get_attribute('.step[data-index="2"]', "data-state") == "failed"

    simulator.configure(fail={"summarizer_pro": None})
    page.click("#resume")

    page.wait_for_selector('#job-status:text-is("COMPLETED")', timeout=30_000)
    assert page.is_hidden("#error-box")
    assert steps_states(page) == ["done"] * 4


def test_a_view_only_user_watches_live_without_buttons(page, asgi_server, worker, simulator, registry, make_staff):
    from orchestration.dispatch import submit_job

    make_staff("looker", "jobs.view_job", password="looker-password")
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    login(page, asgi_server.base_url, "looker", "looker-password")
    job, _ = submit_job(feature_name="viral_video", input_data={})

    page.goto(f"{asgi_server.base_url}/jobs/{job.pk}/")
    page.wait_for_selector('#job-status:text-is("COMPLETED")', timeout=30_000)
    page.goto(f"{asgi_server.base_url}/jobs/")
    page.wait_for_selector(f'tr[data-job-id="{job.pk}"]')

    assert page.query_selector("#cancel") is None and page.query_selector("#resume") is None
    assert page.query_selector("#new-job") is None
    assert errors == []
