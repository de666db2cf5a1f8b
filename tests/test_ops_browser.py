"""The ops console in headless Chromium, against the real stack in-process."""

import re
import time

import pytest

from jobs.models import Job, JobStatus
from orchestration.commands import submit_job
from orchestration.per_process import get_limiter
from services_registry.models import Service
from tests.browser import *  # noqa: F401,F403 (chromium, page, login)
from tests.browser import login

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture
def ops_user(django_user_model):
    return django_user_model.objects.create_superuser("ops", "ops@example.com", "ops-password")


def reload_until(page, predicate, *, timeout_s=30.0, message="the page to change"):
    """Reload ``page`` until ``predicate(page)`` holds, as ops would on a page without live updates."""
    deadline = time.monotonic() + timeout_s
    while not predicate(page):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {message}")
        time.sleep(0.3)
        page.reload()


def test_find_a_failed_job_resume_it_and_see_it_complete(
    page, asgi_server, worker, simulator, registry, ops_user, fast_retries, wait
):
    # Given a job that failed at summarizer_pro (one attempt, the service answered 503)
    Service.objects.filter(name="summarizer_pro").update(max_attempts=1)
    simulator.configure(fail={"summarizer_pro": "503"})
    job, _ = submit_job(feature_name="business_plan", input_data={"business_name": "Admin Co"})
    wait(lambda: Job.objects.get(pk=job.pk).status == JobStatus.FAILED, message="the job to fail")
    base = asgi_server.base_url
    login(page, base, "ops", "ops-password")

    # When ops find it among the failed jobs and open it
    page.goto(f"{base}/admin/jobs/job/?status__exact=FAILED")
    row = page.locator(f'#result_list tbody tr:has(a[href*="{job.pk}"])')
    assert "RESOURCE_EXHAUSTED" in row.inner_text() and "step 3 of 4" in row.inner_text()
    row.locator("th a").click()
    change_page = re.compile(rf"{re.escape(base)}/admin/jobs/job/{job.pk}/change/\?_changelist_filters=.*FAILED")
    page.wait_for_url(change_page)
    assert page.inner_text(".field-status_colored .readonly") == "FAILED"
    assert "JOB_ERROR" in page.inner_text("#content-main")

    # And resume it once the service is fixed
    simulator.configure(fail={"summarizer_pro": None})
    page.click("#cao-op-resume")

    # Then the admin says so (back on the same page, list filters kept), and the job completes
    page.wait_for_url(change_page)
    assert "Resumed from step 3 of 4 (was FAILED)." in page.inner_text("ul.messagelist")
    reload_until(
        page, lambda p: p.inner_text(".field-status_colored .readonly") == "COMPLETED", message="COMPLETED"
    )
    assert "JOB_COMPLETED" in page.inner_text("#content-main")
    assert page.locator("#cao-op-resume").count() == 0


def test_the_occupancy_column_follows_a_limit_edited_in_the_admin(page, asgi_server, registry, ops_user):
    # Given summarizer_pro limited to 3 with two calls in flight
    summarizer = Service.objects.get(name="summarizer_pro")
    Service.objects.filter(pk=summarizer.pk).update(concurrency_limit=3)
    for member in ("job-a:2:1", "job-b:2:1"):
        assert get_limiter().acquire("summarizer_pro", member, limit=3, ttl_s=60, payload="-").granted
    base = asgi_server.base_url
    login(page, base, "ops", "ops-password")
    page.goto(f"{base}/admin/services_registry/service/")
    row = page.locator("#result_list tbody tr", has_text="summarizer_pro")
    assert "in use 2 / 3" in row.locator(".field-occupancy").inner_text()

    # When ops raise the limit to 5 in the service's form
    row.locator("th a").click()
    page.fill("#id_concurrency_limit", "5")
    page.click("input[name=_save]")

    # Then the list shows the same two calls against the new limit
    page.wait_for_url(f"{base}/admin/services_registry/service/")
    row = page.locator("#result_list tbody tr", has_text="summarizer_pro")
    assert "in use 2 / 5" in row.locator(".field-occupancy").inner_text()
    assert Service.objects.get(pk=summarizer.pk).concurrency_limit == 5
