"""/metrics adds up every process of the host: the API counts jobs, workers count calls."""

import pytest
import requests

from tests.test_observability import sample

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_the_api_serves_metrics_recorded_by_worker_processes(testbed, tmp_path):
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    with testbed(env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}) as bed:
        jobs = bed.submit_many(3, "viral_video")
        bed.wait_finished(jobs, timeout=60)

        text = requests.get(f"{bed.base_url}/metrics", timeout=10).text

    # Counted in the API process
    assert sample(text, "cao_jobs_created_total", feature="viral_video") == 3
    # Counted in the three worker processes
    assert sample(text, "cao_jobs_completed_total", feature="viral_video") == 3
    for service in ("prompt_enhancer", "video_gen_v2", "email_notifier"):
        assert sample(text, "cao_step_duration_seconds_count", service=service, outcome="success") == 3
    # Read at scrape time
    assert sample(text, "cao_slot_limit", service="video_gen_v2") == 2
