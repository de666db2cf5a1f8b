"""The README's EventSource example, as written, in headless Chromium against the real stack in-process."""

import re
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from jobs.models import JobEvent
from tests.job_api import create_job
from tests.browser import *  # noqa: F401,F403 (chromium, page)
from tests.test_sse import readme_blocks

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

def test_the_readme_event_source_follows_a_job_to_its_end_and_stops_reconnecting(
    page, asgi_server, worker, simulator, registry, client_key
):
    # Given a job started through the API, and its monitor_url's token
    simulator.configure(latency={"*": "100ms"})
    job_id, token = create_job(asgi_server.base_url, client_key.raw_key)
    stream_answers = []
    page.on("response", lambda response: "/stream" in response.url and stream_answers.append(response.status))
    lines = []
    page.on("console", lambda message: lines.append(message.text))

    # When the README's snippet runs in the console of the docs page
    [snippet] = readme_blocks("Watch it live (Server-Sent Events)", "js")
    snippet = snippet.replace('"JOB_ID"', f'"{job_id}"').replace('"TOKEN"', f'"{token}"')
    page.goto(f"{asgi_server.base_url}/api/v1/docs")
    with page.expect_response(lambda response: "/stream" in response.url and response.status == 204, timeout=30_000):
        with page.expect_console_message(lambda message: message.text == "stream over", timeout=30_000):
            page.evaluate(f"() => {{ {snippet} }}")

    # Then it logged every event once, in order, and the reconnect after the end got 204, which stopped it
    events = [line.split(" ", 2) for line in lines if re.match(r"\d+ ", line)]
    stored = list(JobEvent.objects.filter(job_id=job_id).order_by("seq").values_list("seq", "type"))
    assert [(int(seq), kind) for seq, kind, _ in events] == stored
    assert stored[-1][1] == "JOB_COMPLETED" and lines.count("stream over") == 1
    assert stream_answers == [200, 204]
