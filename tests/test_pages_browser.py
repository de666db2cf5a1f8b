"""The job pages in headless Chromium, against the real stack in-process.

Waits use selectors, not wait_for_function: the pages' Content-Security-Policy
forbids the eval that wait_for_function relies on, as it should.
"""

import re
import uuid

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
    from orchestration.commands import submit_job

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


def follow_socket(monitor_url):
    """Every event a WebSocket receives up to its job's JOB_COMPLETED (20 s of silence fails it)."""
    import json

    from websockets.sync.client import connect

    events = []
    with connect(monitor_url, open_timeout=20) as socket:
        while not events or events[-1]["type"] != "JOB_COMPLETED":
            message = json.loads(socket.recv(timeout=20))
            if message["type"] != "WS_CONNECTED":
                events.append(message)
    return events


def test_a_job_page_reaches_its_final_state_live_during_a_burst_of_watched_jobs(
    page, asgi_server, worker, simulator, registry, staff_user, client_key, wait
):
    from concurrent.futures import ThreadPoolExecutor

    import requests

    from orchestration.commands import submit_job

    simulator.configure(latency={"*": "50ms"})
    login(page, asgi_server.base_url, "ops", "ops-password")
    sessions = [requests.Session() for _ in range(10)]

    def create_and_follow(i):
        response = sessions[i % 10].post(
            f"{asgi_server.base_url}/api/v1/jobs",
            json={"feature_name": "business_plan", "input_data": {"n": i}},
            headers={"X-API-Key": client_key.raw_key},
            timeout=30,
        )
        response.raise_for_status()
        return response.json()["job_id"], follow_socket(response.json()["monitor_url"])

    with ThreadPoolExecutor(10) as pool:
        # Given a burst under way: 40 jobs from 10 clients, each followed by a WebSocket of its own
        burst = [pool.submit(create_and_follow, i) for i in range(40)]
        wait(lambda: Job.objects.count() >= 10, timeout=30, message="the burst under way")
        # When a job is started in the middle of it and its page opened
        watched, _ = submit_job(feature_name="business_plan", input_data={})
        page.goto(f"{asgi_server.base_url}/jobs/{watched.pk}/")

        # Then the page reaches COMPLETED by itself, every step done and every event once, in order
        page.wait_for_selector('#job-status:text-is("COMPLETED")', timeout=60_000)
        followed = [future.result() for future in burst]
    assert steps_states(page) == ["done"] * 4
    assert event_seqs(page) == list(range(1, Job.objects.get(pk=watched.pk).last_event_seq + 1))
    # ... and so did every socket of the burst
    last_seqs = dict(Job.objects.filter(pk__in=[job_id for job_id, _ in followed]).values_list("pk", "last_event_seq"))
    for job_id, events in followed:
        assert [event["seq"] for event in events] == list(range(1, last_seqs[uuid.UUID(job_id)] + 1))


def test_resume_a_failed_job_from_its_page(page, asgi_server, worker, simulator, registry, staff_user, fast_retries):
    from services_registry.models import Service

    Service.objects.filter(name="summarizer_pro").update(max_attempts=1)
    simulator.configure(fail={"summarizer_pro": "503"})
    login(page, asgi_server.base_url, "ops", "ops-password")
    from orchestration.commands import submit_job

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
    from orchestration.commands import submit_job

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


class CrossPortPage:
    """A page of another origin (same host, another port) that opens the job's socket with the browser's cookies."""

    def __init__(self, ws_url):
        import http.server
        import threading

        body = (
            '<!doctype html><p id="outcome"></p><script>'
            f'const socket = new WebSocket("{ws_url}");'
            'const outcome = document.getElementById("outcome");'
            'socket.onmessage = (m) => { outcome.textContent = "message " + JSON.parse(m.data).type; socket.close(); };'
            'socket.onclose = (c) => { if (!outcome.textContent) outcome.textContent = "closed " + c.code; };'
            "</script>"
        ).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_a_page_on_another_port_cannot_watch_a_job_with_the_staff_cookie(page, asgi_server, registry, staff_user):
    from orchestration.commands import submit_job

    # Given a staff user logged in to the gateway, and a page served from another port of the same host
    login(page, asgi_server.base_url, "ops", "ops-password")
    job, _ = submit_job(feature_name="business_plan", input_data={"plan": "confidential"})
    other = CrossPortPage(f"{asgi_server.ws_url}/ws/{job.pk}")

    # When that page opens the job's socket (the browser sends the session cookie along)
    try:
        page.goto(other.url)
        outcome = page.wait_for_selector("#outcome:not(:empty)").inner_text()
    finally:
        other.close()

    # Then the socket is refused, while the gateway's own page still goes live
    assert outcome == "closed 4401"
    page.goto(f"{asgi_server.base_url}/jobs/{job.pk}/")
    page.wait_for_selector('#connection:text-is("live")')


def test_the_pages_policy_lets_their_scripts_connect_to_their_own_origin_only(page, asgi_server, registry, staff_user):
    from jobs.monitor import monitor_token
    from orchestration.commands import submit_job

    # Given a job page, live over its own origin (ws://127.0.0.1:<port>)
    login(page, asgi_server.base_url, "ops", "ops-password")
    job, _ = submit_job(feature_name="business_plan", input_data={})
    page.goto(f"{asgi_server.base_url}/jobs/{job.pk}/")
    page.wait_for_selector('#connection:text-is("live")')

    # When a script on it (say, an injected one) opens a socket to another origin: the
    # same server, named localhost, with a valid token
    elsewhere = f"ws://localhost:{asgi_server.port}/ws/{job.pk}?token={monitor_token(job.pk)}"
    outcome = page.evaluate(
        """(url) => new Promise((resolve) => {
            document.addEventListener("securitypolicyviolation", (e) => resolve("blocked " + e.violatedDirective));
            setTimeout(() => resolve("no outcome within 10 s"), 10000);
            try {
                const socket = new WebSocket(url);
                socket.onopen = () => resolve("open");
            } catch (error) {
                resolve("blocked " + error.name);
            }
        })""",
        elsewhere,
    )

    # Then the Content-Security-Policy blocks it
    assert outcome.startswith("blocked"), outcome
