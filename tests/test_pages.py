"""The staff web pages, through Django's test client."""

import pytest

from jobs.models import Job
from orchestration.commands import submit_job

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_client(client, make_staff):
    client.force_login(make_staff("ops", "jobs.view_job"))
    return client


def test_pages_need_a_staff_login(client, django_user_model, registry):
    job, _ = submit_job(feature_name="business_plan", input_data={})

    for url in ("/jobs/", f"/jobs/{job.pk}/"):
        response = client.get(url)
        assert response.status_code == 302 and "/admin/login/" in response["Location"]
    client.force_login(django_user_model.objects.create_user("someone", password="pw"))
    assert client.get("/jobs/").status_code == 302


def test_home_redirects_to_the_jobs_page(client):
    assert client.get("/")["Location"] == "/jobs/"


def test_jobs_page_lists_recent_jobs_with_progress_and_filters(staff_client, registry):
    plan, _ = submit_job(feature_name="business_plan", input_data={})
    video, _ = submit_job(feature_name="viral_video", input_data={})
    Job.objects.filter(pk=video.pk).update(status="FAILED", error_code="RESOURCE_EXHAUSTED")

    page = staff_client.get("/jobs/").content.decode()
    assert str(plan.pk)[:10] in page and str(video.pk)[:10] in page
    assert '<progress max="4" value="0">' in page and "RESOURCE_EXHAUSTED" in page

    failed = staff_client.get("/jobs/?status=FAILED").content.decode()
    assert str(video.pk)[:10] in failed and str(plan.pk)[:10] not in failed
    plans = staff_client.get("/jobs/?feature=business_plan&partial=1").content.decode()
    assert str(plan.pk)[:10] in plans and str(video.pk)[:10] not in plans and "<html" not in plans
    videos = staff_client.get("/jobs/?feature=viral_video").content.decode()
    assert str(video.pk)[:10] in videos and str(plan.pk)[:10] not in videos


def test_job_page_shows_the_timeline_and_events(staff_client, registry):
    job, _ = submit_job(feature_name="viral_video", input_data={})

    page = staff_client.get(f"/jobs/{job.pk}/").content.decode()

    assert f'data-job-id="{job.pk}"' in page and 'data-last-seq="0"' in page
    for index, service in enumerate(["prompt_enhancer", "video_gen_v2", "email_notifier"]):
        assert f'data-index="{index}" data-state="pending"' in page and service in page


def test_job_page_never_shows_an_event_its_socket_will_replay(staff_client, registry, monkeypatch):
    """An event committed between reading the job and reading its events is left to the socket."""
    from jobs import selectors, views
    from jobs.events import append_events, event

    job, _ = submit_job(feature_name="viral_video", input_data={})
    read_job = selectors.job_get

    def read_then_a_worker_commits(job_id, **kwargs):
        snapshot = read_job(job_id, **kwargs)
        locked = Job.objects.get(pk=job.pk)
        append_events(locked, event("STEP_STARTED", step_index=0, attempt=1))
        locked.save(update_fields=["last_event_seq"])
        return snapshot

    monkeypatch.setattr(views.selectors, "job_get", read_then_a_worker_commits)
    page = staff_client.get(f"/jobs/{job.pk}/").content.decode()

    assert 'data-last-seq="0"' in page and 'data-seq="1"' not in page


def test_unknown_job_page_is_a_404(staff_client):
    assert staff_client.get("/jobs/not-a-job/").status_code == 404
