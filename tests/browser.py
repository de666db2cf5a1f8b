"""Headless Chromium (Debian's /usr/bin/chromium) driven by Playwright, for page tests.

Import the fixtures in a test module with ``from tests.browser import *``;
they skip, saying why, when Chromium is not installed (``make test`` installs it),
and fail instead under ``CI=true`` (``tests.requirements.require``).
"""

import os
import shutil

import pytest

from tests.requirements import require

__all__ = ["chromium", "page", "login"]

CHROMIUM = os.environ.get("CAO_CHROMIUM", "/usr/bin/chromium")
# The machine's network is closed: without these flags Chromium keeps trying
# to reach Google's services.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def require_chromium(path=None):
    """Skip (or fail under CI=true) when there is no Chromium at ``path``."""
    path = path or CHROMIUM
    require(
        os.path.exists(path) or shutil.which(path),
        f"Chromium not found at {path}; `make test` installs Debian's chromium package",
    )


@pytest.fixture(scope="module")
def chromium():
    """One browser per test module: Playwright's sync API keeps an event loop
    in the main thread while it runs, which later non-browser tests must not see."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    # That loop makes Django think the ORM is called from async code; the
    # tests' own ORM calls are plain synchronous ones.
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            yield browser
            browser.close()
    finally:
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.fixture
def page(chromium):
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(15_000)
    page = context.new_page()
    yield page
    context.close()


def login(page, base_url, username, password):
    """Log in through the admin login form, as a person would."""
    page.goto(f"{base_url}/admin/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("input[type=submit]")
    page.wait_for_url(f"{base_url}/admin/")
