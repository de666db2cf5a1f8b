"""Creating a job through the API, as a client would, for tests that then watch it."""

from urllib.parse import parse_qs, urlsplit

import requests


def create_job(base_url, api_key, *, input_data=None, session=requests):
    """POST a business_plan job; returns ``(job_id, monitor token)`` from the answer's monitor_url."""
    response = session.post(
        f"{base_url}/api/v1/jobs",
        json={"feature_name": "business_plan", "input_data": input_data if input_data is not None else {}},
        headers={"X-API-Key": api_key},
        timeout=30,
    )
    response.raise_for_status()
    created = response.json()
    return created["job_id"], parse_qs(urlsplit(created["monitor_url"]).query)["token"][0]


def post_job(api, feature="business_plan", input_data=None):
    """Create a job through a DRF test client (``api``); returns its id."""
    response = api.post(
        "/api/v1/jobs",
        {"feature_name": feature, "input_data": input_data or {"business_name": "Acme Labs"}},
        format="json",
    )
    assert response.status_code == 201, response.content
    return response.json()["job_id"]
