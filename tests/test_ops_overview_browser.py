"""The live overview in headless Chromium: found from the admin, updated in place, laid out to be read.

Waits use selectors, not wait_for_function: the admin's Content-Security-Policy
forbids the eval that wait_for_function relies on.
"""

import os
from pathlib import Path

import pytest

from orchestration.per_process import get_limiter
from services_registry.models import Service
from tests.browser import *  # noqa: F401,F403 (chromium, page, login)
from tests.browser import login
from tests.test_ops_admin import completed_job, failed_job

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

LLM = 'tr[data-service="fast_chat_llm"]'


@pytest.fixture
def on_call(make_staff):
    return make_staff("oncall", "jobs.view_job", "services_registry.view_service", password="oncall-password")


def box(page, selector):
    found = page.locator(selector).first.bounding_box()
    assert found is not None, f"{selector} is not displayed"
    return found


def test_the_overview_follows_the_limiter_and_the_attempts_without_a_reload(page, asgi_server, registry, on_call):
    errors, navigations = [], []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("framenavigated", lambda frame: navigations.append(frame.url) if frame == page.main_frame else None)
    limiter = get_limiter()
    assert limiter.acquire("fast_chat_llm", "job-a:1:1", limit=15, ttl_s=60, payload="-").granted

    # Given ops, logged in, who open the overview from the admin's index
    login(page, asgi_server.base_url, "oncall", "oncall-password")
    page.click("#cao-overview-entry a")
    page.wait_for_url(f"{asgi_server.base_url}/admin/overview/")
    page.wait_for_selector('#ov-connection[data-state="live"]')

    # Then fast_chat_llm shows one slot of 15 in use, as a bar, and no call yet
    assert page.inner_text(f"{LLM} .ov-slots .ov-figure") == "1 / 15"
    fill = page.get_attribute(f"{LLM} .ov-slots .ov-fill", "style")
    assert "width: 6.7%" in fill
    assert page.get_attribute(f"{LLM} .ov-slots [role=meter]", "aria-valuenow") == "1"
    assert page.inner_text(f"{LLM} .ov-calls") == "0" and page.inner_text(f"{LLM} .ov-p95") == "–"
    assert page.inner_text(f"{LLM} .ov-state") == "ok"
    assert page.locator('#ov-queues tr[data-queue="medium"] .ov-ready').inner_text() == "0"
    loaded = len(navigations)

    # When a second slot is taken, a business plan completes and another fails at summarizer_pro
    assert limiter.acquire("fast_chat_llm", "job-b:1:1", limit=15, ttl_s=60, payload="-").granted
    completed_job()
    failed_job()

    # Then the page shows it by itself: two slots, calls counted, both jobs in this minute's bar
    page.wait_for_selector(f'{LLM} .ov-slots .ov-figure:text-is("2 / 15")')
    page.wait_for_selector(f'{LLM} .ov-calls:text-is("2")')
    page.wait_for_selector('tr[data-service="summarizer_pro"] .ov-failures.ov-bad')
    assert page.inner_text('tr[data-service="summarizer_pro"] .ov-failures') == "1 (50 %)"
    assert page.inner_text(f"{LLM} .ov-p95").endswith(" ms")
    # (the two jobs may end on either side of a minute's turn)
    page.wait_for_selector('#ov-jobs-chart g.ov-minute[data-failed="1"] rect.ov-failed')
    assert page.locator('#ov-jobs-chart g.ov-minute[data-completed="1"] rect.ov-completed').count() == 1
    assert page.locator("#ov-jobs-chart g.ov-minute").count() == 60
    assert page.locator("#ov-failure-chart g.ov-minute rect.ov-failed").count() == 1
    assert "1 completed, 1 failed, 2 created" in page.inner_text("#ov-jobs-total")
    assert "50 % (1 of 2)" in page.inner_text("#ov-failure-total")

    # And when the limiter cools the service down, its state says so
    limiter.cool_down("fast_chat_llm", seconds=30)
    page.wait_for_selector(f'{LLM} .ov-state [data-state="cooling"]')
    assert len(navigations) == loaded, f"the page reloaded: {navigations}"
    assert errors == []


def test_a_session_that_ends_stops_the_polling_and_says_so(page, asgi_server, registry, on_call):
    login(page, asgi_server.base_url, "oncall", "oncall-password")
    page.goto(f"{asgi_server.base_url}/admin/overview/")
    page.wait_for_selector('#ov-connection[data-state="live"]')

    page.context.clear_cookies()

    page.wait_for_selector('#ov-connection[data-state="refused"]')
    assert page.inner_text("#ov-connection") == "stopped: log in again to see live figures"
    # The last figures stay on screen.
    assert page.locator("#ov-services tr").count() == Service.objects.count()


def test_the_layout_holds_on_a_wide_and_a_narrow_screen(page, asgi_server, registry, on_call, tmp_path):
    tmp_path = Path(os.environ.get("CAO_SCREENSHOT_DIR") or tmp_path)
    # Given every kind of figure on screen: a full line, a spent budget, a cool-down and a week's worth of jobs
    limiter = get_limiter()
    for member in ("c:1:1", "d:1:1", "e:1:1"):
        limiter.acquire("video_gen_v2", member, limit=2, ttl_s=660, payload="-")
    Service.objects.filter(name="summarizer_pro").update(requests_per_minute=2, tokens_per_minute=50_000)
    for n in range(2):
        limiter.acquire("summarizer_pro", f"s{n}:2:1", limit=10, ttl_s=60, payload="-", requests_per_minute=2)
    limiter.cool_down("prompt_enhancer", seconds=60)
    completed_job()
    failed_job()
    login(page, asgi_server.base_url, "oncall", "oncall-password")

    # When the overview is opened wide
    page.goto(f"{asgi_server.base_url}/admin/overview/")
    page.wait_for_selector('#ov-connection[data-state="live"]')
    page.screenshot(path=tmp_path / "overview-wide.png", full_page=True)

    # Then nothing runs off the page, and the two charts stand side by side, each drawn
    assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    # (the table fits its box: it does not need to scroll at this width)
    assert page.evaluate("(el => el.scrollWidth <= el.clientWidth)(document.querySelector('.ov-scroll'))")
    jobs_chart, failure_chart = box(page, "#ov-jobs-chart"), box(page, "#ov-failure-chart")
    assert abs(jobs_chart["y"] - failure_chart["y"]) < 1 and jobs_chart["x"] + jobs_chart["width"] <= failure_chart["x"]
    assert jobs_chart["height"] > 120 and failure_chart["height"] > 120
    # Each bar's fill stays within its track; a full one is drawn full
    video_track = box(page, 'tr[data-service="video_gen_v2"] .ov-slots .ov-track')
    video_fill = box(page, 'tr[data-service="video_gen_v2"] .ov-slots .ov-fill')
    assert video_fill["width"] <= video_track["width"] and video_fill["width"] >= video_track["width"] - 3
    assert "ov-full" in page.get_attribute('tr[data-service="video_gen_v2"] .ov-slots .ov-fill', "class")
    # Rows are one line each: the figures do not wrap under the bars
    row_heights = [box(page, f'tr[data-service="{name}"]')["height"] for name in ("video_gen_v2", "summarizer_pro")]
    assert max(row_heights) < 48, row_heights

    # When the window is narrow
    page.set_viewport_size({"width": 760, "height": 900})
    page.wait_for_selector('#ov-connection[data-state="live"]')
    page.screenshot(path=tmp_path / "overview-narrow.png", full_page=True)

    # Then the charts stack, and the wide table scrolls within its box instead of the page
    jobs_chart, failure_chart = box(page, "#ov-jobs-chart"), box(page, "#ov-failure-chart")
    assert failure_chart["y"] >= jobs_chart["y"] + jobs_chart["height"]
    assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    assert page.evaluate("(el => el.scrollWidth > el.clientWidth)(document.querySelector('.ov-scroll'))")
