"""The job pages in headless Chromium, against the real stack in-process.

Waits use selectors, not wait_for_function: the pages' Content-Security-Policy
forbids the eval that wait_for_function relies on, as it should.
"""

import json
import os
import re
import uuid
from pathlib import Path

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


# --- The work behind the timeline: waterfall, what holds a step, outputs, errors, the resume command ------

BLOCKER = "blocker:0:1"


def block_prompt_enhancer():
    """Take prompt_enhancer's only slot, so a new job's first step waits in line until ``unblock``."""
    from orchestration.per_process import get_limiter
    from services_registry.models import Service

    Service.objects.filter(name="prompt_enhancer").update(concurrency_limit=1)
    assert get_limiter().acquire("prompt_enhancer", BLOCKER, limit=1, ttl_s=120, payload="-").granted


def unblock_prompt_enhancer():
    """Give the slot back: the waiting step is handed it and its message sent, as a worker's release would."""
    from orchestration.per_process import get_limiter
    from orchestration.slots import send_handoffs

    send_handoffs(get_limiter().release("prompt_enhancer", BLOCKER, limit=1))


def open_waiting_job(page, asgi_server, wait, **job):
    """Submit a job whose first step waits for prompt_enhancer, and open its page once it does."""
    from orchestration.commands import submit_job

    block_prompt_enhancer()
    submitted, _ = submit_job(feature_name="business_plan", **job)
    wait(lambda: Job.objects.get(pk=submitted.pk).step_state == "WAITING", message="the first step parked")
    page.goto(f"{asgi_server.base_url}/jobs/{submitted.pk}/")
    page.wait_for_selector('#connection:text-is("live")')
    return submitted


def watch_to_the_end(page, job, wait, status=JobStatus.COMPLETED):
    """Wait for the job to end, and for the page to have drawn the data of its last event."""
    wait(lambda: Job.objects.get(pk=job.pk).status == status, timeout=30, message=f"the job {status}")
    last_seq = Job.objects.get(pk=job.pk).last_event_seq
    page.wait_for_selector(f'#job-status:text-is("{status}")')
    page.wait_for_selector(f'#job[data-rendered-seq="{last_seq}"]')


def bars(page, row):
    return page.eval_on_selector_all(
        f'.wf-row[data-index="{row}"] .wf-bar',
        "bars => bars.map(b => ({kind: b.dataset.kind, cls: b.className, title: b.title,"
        " start: Number(b.dataset.startMs), end: Number(b.dataset.endMs)}))",
    )


def box(page, selector):
    found = page.locator(selector).first.bounding_box()
    assert found is not None, f"{selector} is not displayed"
    return found


def png_size(path):
    """(width, height) from a PNG's header."""
    import struct

    header = Path(path).read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def test_the_page_shows_the_work_live_a_wait_a_retry_outputs_and_errors_and_its_layout_holds(
    page, asgi_server, worker, simulator, registry, staff_user, fast_retries, wait, tmp_path
):
    shots = Path(os.environ.get("CAO_SCREENSHOT_DIR") or tmp_path)
    errors, navigations = [], []
    page.on("pageerror", lambda error: errors.append(str(error)))
    simulator.configure(latency={"*": "100ms", "fast_chat_llm": "1200ms"}, fail={"fast_chat_llm": "503x1"})
    login(page, asgi_server.base_url, "ops", "ops-password")
    hostile = "<script>window.caoInjected = true</script>"

    # Given a job whose first step waits for prompt_enhancer's only slot, its page open
    job = open_waiting_job(page, asgi_server, wait, input_data={"topic": f"{hostile} a Mars bakery"})
    page.on("framenavigated", lambda frame: navigations.append(frame.url) if frame == page.main_frame else None)

    # Then the step says what holds it, and its wait runs on in the waterfall
    held = '.step-work[data-index="0"] .held-by'
    assert page.inner_text(held).startswith("waiting for a slot of prompt_enhancer — held by concurrency, 1st in line")
    assert [bar["kind"] for bar in bars(page, 0)] == ["wait"]
    assert "wf-ongoing" in bars(page, 0)[0]["cls"]
    # ... growing by the page's clock while nothing happens
    shown = bars(page, 0)[0]["end"]
    wait(lambda: bars(page, 0)[0]["end"] >= shown + 1000, timeout=10, message="the wait's bar to grow")
    assert hostile in page.inner_text("#input-json")

    # When the slot is given back: the job runs, fast_chat_llm fails once and succeeds on its retry
    unblock_prompt_enhancer()
    output = '.step-work[data-index="0"] details.output'
    page.wait_for_selector(output)
    page.click(f"{output} summary")  # read while the job goes on: redraws must keep it open
    watch_to_the_end(page, job, wait)

    # Then, without a reload: nothing holds the step any more, and every attempt is on the waterfall
    assert navigations == [] and errors == []
    assert page.locator(".held-by").count() == 0
    assert [[bar["kind"] for bar in bars(page, row)] for row in range(4)] == [
        ["wait", "call"], ["call", "backoff", "call"], ["call"], ["call"],
    ]
    wait_bar, first_call = bars(page, 0)
    assert "held by concurrency, 1st in line" in wait_bar["title"] and wait_bar["end"] == first_call["start"]
    failed, backoff, retried = bars(page, 1)
    assert "wf-failed" in failed["cls"] and "fast_chat_llm · attempt 1 · FAILED (503" in failed["title"]
    assert "retry back-off after attempt 1" in backoff["title"] and failed["end"] <= backoff["start"]
    assert "wf-succeeded" in retried["cls"] and backoff["end"] <= retried["start"]
    assert re.search(r"\n\d+(\.\d+)? (ms|s) · from \+", failed["title"]), failed["title"]
    # ... the output opened above stays open, shown as text: the script in it never ran
    assert page.get_attribute(output, "open") is not None
    assert hostile in page.inner_text(f"{output} pre")
    assert page.evaluate("window.caoInjected === undefined")
    # ... and the failed attempt's error unfolds as JSON
    error = '.step-work[data-index="1"] details.attempt-error'
    assert page.inner_text(f"{error} summary").startswith("attempt 1 failed: ")
    page.click(f"{error} summary")
    shown = json.loads(page.inner_text(f"{error} pre"))
    assert shown["http_status"] == 503 and shown["code"]

    # And the layout holds at 1280 px: nothing runs off the page, bars stay on their axis, in time order
    page.screenshot(path=shots / "job-page.png", full_page=True)
    assert png_size(shots / "job-page.png")[0] == 1280
    assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    placed = []
    for row in range(4):
        track = box(page, f'.wf-row[data-index="{row}"] .wf-track')
        for n, bar in enumerate(bars(page, row)):
            found = page.locator(f'.wf-row[data-index="{row}"] .wf-bar').nth(n).bounding_box()
            assert track["x"] - 0.5 <= found["x"] and found["x"] + found["width"] <= track["x"] + track["width"] + 0.5
            assert track["y"] <= found["y"] and found["y"] + found["height"] <= track["y"] + track["height"]
            placed.append((bar["start"], found["x"], row))
    placed.sort()
    assert [x for _, x, _ in placed] == sorted(x for _, x, _ in placed), placed
    assert [row for _, _, row in placed] == sorted(row for _, _, row in placed)  # each step after the one before
    axis = box(page, ".wf-axis .wf-ticks")
    first_track = box(page, '.wf-row[data-index="0"] .wf-track')
    assert (axis["x"], axis["width"]) == (first_track["x"], first_track["width"])
    for n in range(5):
        tick = page.locator(".wf-tick").nth(n).bounding_box()
        assert axis["x"] - 0.5 <= tick["x"] and tick["x"] + tick["width"] <= axis["x"] + axis["width"] + 0.5


def test_a_failed_jobs_resume_command_appears_live_copies_to_the_clipboard_and_goes_with_the_resume(
    page, asgi_server, worker, simulator, registry, staff_user, fast_retries, wait
):
    from services_registry.models import Service

    Service.objects.filter(name="summarizer_pro").update(max_attempts=1)
    simulator.configure(latency={"*": "50ms"}, fail={"summarizer_pro": "503"})
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=asgi_server.base_url)
    login(page, asgi_server.base_url, "ops", "ops-password")

    # Given a running job's page, with no resume command: the job has not failed
    job = open_waiting_job(page, asgi_server, wait, input_data={})
    assert page.is_hidden("#resume-command")

    # When it fails at summarizer_pro
    unblock_prompt_enhancer()
    watch_to_the_end(page, job, wait, status=JobStatus.FAILED)

    # Then the command to resume it appears, and Copy puts it in the clipboard
    expected = f'curl -s -X POST {asgi_server.base_url}/api/v1/jobs/{job.pk}/resume -H "X-API-Key: $CAO_KEY"'
    page.wait_for_selector("#resume-command:not([hidden])")
    assert page.inner_text("#resume-curl") == expected and page.is_hidden("#resume-force-note")
    page.click("#copy-resume")
    page.wait_for_selector('#copy-outcome:text-is("Copied.")')
    assert page.evaluate("navigator.clipboard.readText()") == expected

    # And once the job is resumed and completes, the command is gone
    simulator.configure(fail={"summarizer_pro": None})
    page.click("#resume")
    watch_to_the_end(page, job, wait)
    assert page.is_hidden("#resume-command")


def test_without_a_clipboard_copy_selects_the_command_to_copy_by_hand(page, asgi_server, registry, staff_user):
    from orchestration.commands import submit_job

    job, _ = submit_job(feature_name="business_plan", input_data={})
    Job.objects.filter(pk=job.pk).update(status=JobStatus.FAILED, step_state="IDLE", retryable=False,
                                         error_code="DEADLINE_EXCEEDED")
    # A page without navigator.clipboard, as over plain http on another host
    page.add_init_script('Object.defineProperty(navigator, "clipboard", { value: undefined, configurable: true })')
    login(page, asgi_server.base_url, "ops", "ops-password")
    page.goto(f"{asgi_server.base_url}/jobs/{job.pk}/")

    page.click("#copy-resume")

    page.wait_for_selector('#copy-outcome:text-is("Selected: press Ctrl+C to copy.")')
    command = page.inner_text("#resume-curl")
    assert command.endswith("""-H "Content-Type: application/json" -d '{"force": true}'""")
    assert page.is_visible("#resume-force-note")
    assert page.evaluate("String(window.getSelection())") == command


def test_the_webhook_deliveries_are_listed_with_a_link_to_each_in_the_admins_log(page, asgi_server, registry,
                                                                                make_staff):
    from tests.test_pages import make_delivery, webhook_job

    make_staff("hooks", "jobs.view_job", "webhooks.view_delivery", password="hooks-password")
    job = webhook_job()
    delivered = make_delivery(job, 2, "DELIVERED", (120, 500), (45, 204), event_type="STEP_COMPLETED")
    make_delivery(job, 5, "PENDING", (300, 500))
    login(page, asgi_server.base_url, "hooks", "hooks-password")

    page.goto(f"{asgi_server.base_url}/jobs/{job.pk}/")

    page.wait_for_selector("#deliveries-section:not([hidden])")
    assert page.inner_text("#webhook-url") == "https://hooks.example.com/cao"
    rows = page.eval_on_selector_all(
        "#deliveries tr", "rows => rows.map(r => [...r.cells].map(c => c.innerText.trim()))"
    )
    assert [row[:6] for row in rows] == [
        [delivered.webhook_id, "STEP_COMPLETED", "DELIVERED", "2", "204", "45 ms"],
        [f"evt_{job.pk.hex}_5", "JOB_COMPLETED", "PENDING", "1", "500", "300 ms"],
    ]
    assert rows[0][6] == "–" and rows[1][6].endswith(" UTC") and rows[1][7] == "HTTP 500"
    page.click('#deliveries tr[data-seq="2"] a')
    page.wait_for_url(f"{asgi_server.base_url}/admin/webhooks/delivery/{delivered.pk}/change/")
    page.go_back()
    page.click("#delivery-log")
    page.wait_for_url(re.compile(r".*/admin/webhooks/delivery/\?job__exact="))
    assert page.locator("#result_list tbody tr").count() == 2
