"""Security and bad input: keys, ownership, limits, throttling, CORS/CSRF, headers, secrets."""

import http.server
import io
import json
import logging
import threading
import uuid

import pytest
import requests
from django.contrib.admin.models import LogEntry
from django.core.management import call_command
from rest_framework.test import APIClient

from api_keys.models import ApiKey
from jobs.models import Job, JobEvent, JobStatus

pytestmark = pytest.mark.django_db


def create(client, **extra):
    return client.post(
        "/api/v1/jobs", {"feature_name": "business_plan", "input_data": {"topic": "tea"}}, format="json", **extra
    )


def error_code(response):
    return response.json()["error"]["code"]


# --- API keys ------------------------------------------------------------------------


def test_only_a_hash_and_a_prefix_of_a_key_are_stored():
    api_key, raw_key = ApiKey.objects.create_key(name="billing")

    assert raw_key.startswith(f"cao_{api_key.prefix}_") and len(raw_key) > 40
    assert raw_key not in (api_key.key_hash, api_key.prefix)
    assert api_key.matches(raw_key) and not api_key.matches(raw_key + "x")


def test_both_header_forms_authenticate_and_record_last_use(registry):
    api_key, raw_key = ApiKey.objects.create_key(name="c")
    client = APIClient()

    assert client.get("/api/v1/features", HTTP_AUTHORIZATION=f"Api-Key {raw_key}").status_code == 200
    assert client.get("/api/v1/features", HTTP_X_API_KEY=raw_key).status_code == 200
    api_key.refresh_from_db()
    assert api_key.last_used_at is not None


def test_an_inactive_key_is_refused(registry):
    api_key, raw_key = ApiKey.objects.create_key(name="old")
    ApiKey.objects.filter(pk=api_key.pk).update(is_active=False)

    response = APIClient().get("/api/v1/features", HTTP_X_API_KEY=raw_key)

    assert response.status_code == 401 and error_code(response) == "AUTHENTICATION_FAILED"
    assert response["WWW-Authenticate"] == "Api-Key"


def test_a_key_deactivated_or_deleted_in_this_process_is_refused_at_once(registry, settings):
    settings.CAO_API_KEY_CACHE_S = 60  # far longer than the test
    client = APIClient()
    for change in ("deactivate", "delete"):
        api_key, raw_key = ApiKey.objects.create_key(name=change)
        assert client.get("/api/v1/features", HTTP_X_API_KEY=raw_key).status_code == 200  # now cached

        if change == "deactivate":
            api_key.is_active = False
            api_key.save()
        else:
            api_key.delete()

        assert client.get("/api/v1/features", HTTP_X_API_KEY=raw_key).status_code == 401


def test_a_key_deactivated_by_another_process_stops_working_within_the_cache_age(registry, settings):
    from api_keys.authentication import active_key

    settings.CAO_API_KEY_CACHE_S = 5
    now = [1000.0]
    api_key, raw_key = ApiKey.objects.create_key(name="elsewhere")
    assert active_key(raw_key, clock=lambda: now[0]) == api_key

    ApiKey.objects.filter(pk=api_key.pk).update(is_active=False)  # no signal reaches this process

    now[0] += 4.9
    assert active_key(raw_key, clock=lambda: now[0]) == api_key  # trusted while its row is that recent
    now[0] += 0.2
    assert active_key(raw_key, clock=lambda: now[0]) is None


def test_only_keys_that_matched_are_remembered(registry, settings):
    from api_keys import authentication

    settings.CAO_API_KEY_CACHE_S = 60
    api_key, raw_key = ApiKey.objects.create_key(name="real")
    authentication._recent.clear()
    for attempt in range(50):
        assert authentication.active_key(f"{raw_key}{attempt}") is None
    assert authentication.active_key(f"cao_{attempt}_x") is None
    assert authentication._recent == {}
    assert authentication.active_key(raw_key) == api_key
    assert len(authentication._recent) == 1


def test_create_api_key_prints_the_key_alone_on_its_last_line():
    out, err = io.StringIO(), io.StringIO()

    call_command("create_api_key", "reporting", "--staff", stdout=out, stderr=err)

    raw_key = out.getvalue().strip().splitlines()[-1]
    api_key = ApiKey.objects.get(name="reporting")
    assert api_key.is_staff and api_key.matches(raw_key)
    assert raw_key not in err.getvalue()


def test_the_admin_shows_a_new_key_once(client, django_user_model):
    client.force_login(django_user_model.objects.create_superuser("root", "r@example.com", "pw"))

    response = client.post(
        "/admin/api_keys/apikey/add/",
        {
            "name": "partner", "is_active": "on", "share_weight": "1", "max_calls_per_service": "0",
            "max_concurrent_jobs": "0",
        },
        follow=True,
    )

    page = response.content.decode()
    api_key = ApiKey.objects.get(name="partner")
    shown = page.split("The new API key is ")[1].split(" ")[0]
    assert api_key.matches(shown)
    listing = client.get("/admin/api_keys/apikey/").content.decode()
    assert f"cao_{api_key.prefix}_" in listing and shown not in listing
    assert LogEntry.objects.filter(object_id=str(api_key.pk)).exists()


def test_anonymous_access_is_off_by_default_and_scoped_when_enabled(registry, settings, api):
    anonymous = APIClient()
    assert anonymous.get("/api/v1/jobs").status_code == 401

    settings.CAO_ALLOW_ANONYMOUS = True
    owned = create(api).json()["job_id"]
    mine = create(anonymous).json()["job_id"]

    assert Job.objects.get(pk=mine).owner == ApiKey.objects.anonymous()
    assert [job["job_id"] for job in anonymous.get("/api/v1/jobs").json()["results"]] == [mine]
    assert anonymous.get(f"/api/v1/jobs/{owned}").status_code == 404


def test_anonymous_clients_never_see_the_jobs_of_staff_sessions(registry, settings, make_staff):
    # Given anonymous access on, and a job started from the staff pages (a session: no API key)
    settings.CAO_ALLOW_ANONYMOUS = True
    staff = APIClient()
    staff.force_login(make_staff("ops", "jobs.add_job", "jobs.view_job"))
    staff_job = create(staff).json()["job_id"]
    anonymous = APIClient()
    mine = create(anonymous).json()["job_id"]

    # When an anonymous client lists and reads jobs
    listed = [job["job_id"] for job in anonymous.get("/api/v1/jobs").json()["results"]]

    # Then it sees its own job only, and the staff one is a 404 for it everywhere
    assert listed == [mine]
    for url in (f"/api/v1/jobs/{staff_job}", f"/api/v1/jobs/{staff_job}/events"):
        assert anonymous.get(url).status_code == 404
    assert anonymous.post(f"/api/v1/jobs/{staff_job}/cancel").status_code == 404
    assert {job["job_id"] for job in staff.get("/api/v1/jobs").json()["results"]} == {mine, staff_job}


def test_no_raw_key_authenticates_as_the_anonymous_owner(registry):
    anonymous = ApiKey.objects.anonymous()

    for raw_key in (f"cao_{anonymous.prefix}_" + "x" * 43, f"cao_{anonymous.prefix}_"):
        response = APIClient().get("/api/v1/jobs", HTTP_X_API_KEY=raw_key)
        assert response.status_code == 401, raw_key
    assert not anonymous.matches("")


# --- Staff sessions: exactly what the admin grants ------------------------------------


def fail_job(job_id, *, retryable):
    Job.objects.filter(pk=job_id).update(
        status=JobStatus.FAILED, step_state="IDLE", retryable=retryable, error_code="DOWNSTREAM_REJECTED",
        error_message="refused", current_step_index=1,
    )


def session_client(user):
    client = APIClient()
    client.force_login(user)
    return client


# permissions -> (read: job, list, events, pages; cancel; force-resume; start a job)
SESSION_RIGHTS = [
    ((), (403, 403, 403, 403)),
    (("jobs.view_job",), (200, 403, 403, 403)),
    (("jobs.change_job",), (200, 200, 200, 403)),
    (("jobs.add_job",), (403, 403, 403, 201)),
    (("jobs.view_job", "jobs.change_job", "jobs.add_job"), (200, 200, 200, 201)),
]


@pytest.mark.parametrize(
    "permissions, expected", SESSION_RIGHTS, ids=["+".join(p.split(".")[1] for p in perms) or "none" for perms, _ in SESSION_RIGHTS]
)
def test_a_staff_session_gets_exactly_the_job_permissions_the_admin_grants(registry, make_staff, permissions, expected):
    # Given a pending job, a non-retryable failed job, and a staff user with some permissions
    from orchestration.commands import submit_job

    pending, _ = submit_job(feature_name="business_plan", input_data={"secret_plan": "tea"})
    failed, _ = submit_job(feature_name="business_plan", input_data={})
    fail_job(failed.pk, retryable=False)
    session = session_client(make_staff("ops", *permissions))
    read, cancel, force, start = expected

    # When it reads, cancels, force-resumes and starts jobs through the API and the pages
    reads = [
        session.get(f"/api/v1/jobs/{pending.pk}"),
        session.get("/api/v1/jobs"),
        session.get(f"/api/v1/jobs/{pending.pk}/events"),
        session.get("/jobs/"),
        session.get(f"/jobs/{pending.pk}/"),
    ]
    cancelled = session.post(f"/api/v1/jobs/{pending.pk}/cancel")
    forced = session.post(f"/api/v1/jobs/{failed.pk}/resume", {"force": True}, format="json")
    started = create(session)

    # Then each answer is what its permission allows, and a refusal changes nothing
    assert [response.status_code for response in reads] == [read] * 5
    assert (cancelled.status_code, forced.status_code, started.status_code) == (cancel, force, start)
    if read == 403:
        assert "secret_plan" not in reads[0].content.decode()
        assert error_code(reads[0]) == "PERMISSION_DENIED" and "jobs.view_job" in reads[0].json()["error"]["message"]
    if cancel == 403:
        assert Job.objects.get(pk=pending.pk).status == JobStatus.PENDING
        assert "jobs.change_job" in cancelled.json()["error"]["message"]
    if force == 403:
        assert Job.objects.get(pk=failed.pk).status == JobStatus.FAILED
    if start == 403:
        assert Job.objects.count() == 2


def test_a_refused_session_learns_nothing_about_which_jobs_exist(registry, make_staff):
    from orchestration.commands import submit_job

    job, _ = submit_job(feature_name="business_plan", input_data={})
    session = session_client(make_staff("ops"))

    real = session.get(f"/api/v1/jobs/{job.pk}")
    unknown = session.get(f"/api/v1/jobs/{uuid.uuid4()}")

    assert real.status_code == unknown.status_code == 403
    assert real.json() == unknown.json()
    assert session.get(f"/jobs/{job.pk}/").status_code == session.get(f"/jobs/{uuid.uuid4()}/").status_code == 403


def test_the_pages_offer_only_the_buttons_the_permissions_allow(registry, make_staff):
    from orchestration.commands import submit_job

    job, _ = submit_job(feature_name="business_plan", input_data={})
    viewer = session_client(make_staff("viewer", "jobs.view_job"))
    operator = session_client(make_staff("operator", "jobs.change_job", "jobs.add_job"))

    viewed = viewer.get(f"/jobs/{job.pk}/").content.decode(), viewer.get("/jobs/").content.decode()
    operated = operator.get(f"/jobs/{job.pk}/").content.decode(), operator.get("/jobs/").content.decode()

    assert 'id="cancel"' not in viewed[0] and 'id="resume"' not in viewed[0] and 'id="new-job"' not in viewed[1]
    assert 'id="cancel"' in operated[0] and 'id="resume"' in operated[0] and 'id="new-job"' in operated[1]


def test_registry_endpoints_need_the_registry_view_permissions_for_sessions(registry, make_staff):
    nothing = session_client(make_staff("ops"))
    viewer = session_client(make_staff("viewer", "services_registry.view_recipe", "services_registry.view_service"))

    assert nothing.get("/api/v1/features").status_code == 403
    assert nothing.get("/api/v1/services").status_code == 403
    assert viewer.get("/api/v1/features").status_code == 200
    assert viewer.get("/api/v1/services").status_code == 200


def login_over_http(base_url, username, password):
    """A requests session logged in through the admin's form, and its CSRF token, as a browser would have them."""
    session = requests.Session()
    session.get(f"{base_url}/admin/login/", timeout=10)
    response = session.post(
        f"{base_url}/admin/login/",
        data={
            "username": username, "password": password, "next": "/admin/",
            "csrfmiddlewaretoken": session.cookies["csrftoken"],
        },
        timeout=10,
        allow_redirects=False,
    )
    assert response.status_code == 302, response.text[:500]
    return session, session.cookies["csrftoken"]


@pytest.mark.django_db(transaction=True)
def test_the_probe_a_view_only_staff_session_cannot_cancel_or_force_resume_over_http(registry, asgi_server, make_staff):
    # Given a staff user the admin lets only look at jobs, logged in, with a CSRF token
    from orchestration.commands import submit_job

    make_staff("looker", "jobs.view_job", password="looker-password")
    pending, _ = submit_job(feature_name="business_plan", input_data={})
    failed, _ = submit_job(feature_name="business_plan", input_data={})
    fail_job(failed.pk, retryable=False)
    session, csrf = login_over_http(asgi_server.base_url, "looker", "looker-password")
    headers = {"X-CSRFToken": csrf}

    # When it cancels one job and force-resumes the other through the API
    cancel = session.post(f"{asgi_server.base_url}/api/v1/jobs/{pending.pk}/cancel", headers=headers, timeout=10)
    force = session.post(
        f"{asgi_server.base_url}/api/v1/jobs/{failed.pk}/resume", json={"force": True}, headers=headers, timeout=10
    )
    admin_cancel = session.post(
        f"{asgi_server.base_url}/admin/jobs/job/{pending.pk}/operate/cancel/", headers=headers, timeout=10
    )

    # Then the API refuses as the admin's button does, and both jobs are untouched
    assert (cancel.status_code, force.status_code, admin_cancel.status_code) == (403, 403, 403)
    assert cancel.json()["error"]["code"] == "PERMISSION_DENIED"
    assert session.get(f"{asgi_server.base_url}/api/v1/jobs/{pending.pk}", timeout=10).status_code == 200
    assert Job.objects.get(pk=pending.pk).status == JobStatus.PENDING
    assert Job.objects.get(pk=failed.pk).status == JobStatus.FAILED


# --- Limits ----------------------------------------------------------------------------


def test_bodies_over_the_limit_get_413(api, registry, settings):
    settings.CAO_MAX_BODY_BYTES = 1000

    response = api.post("/api/v1/jobs", {"feature_name": "business_plan", "input_data": {"x": "y" * 2000}}, format="json")

    assert response.status_code == 413
    assert error_code(response) == "PAYLOAD_TOO_LARGE"
    assert Job.objects.count() == 0


def post_chunked(asgi_server, chunks):
    """POST ``chunks`` (an iterable of bytes) to /api/v1/jobs with chunked transfer encoding."""
    _, raw_key = ApiKey.objects.create_key(name="c")
    return requests.post(
        f"{asgi_server.base_url}/api/v1/jobs",
        data=(chunk for chunk in chunks),  # a generator: no length, so chunked
        headers={"X-API-Key": raw_key, "Content-Type": "application/json"},
        timeout=10,
    )


@pytest.mark.django_db(transaction=True)
def test_chunked_bodies_over_the_limit_get_413_over_real_http(registry, asgi_server, settings):
    settings.CAO_MAX_BODY_BYTES = 1000

    response = post_chunked(
        asgi_server,
        [b'{"feature_name": "business_plan", "input_data": {"x": "', *[b"y" * 100] * 20, b'"}}'],
    )

    assert response.status_code == 413 and response.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"


@pytest.mark.django_db(transaction=True)
def test_chunked_bodies_within_the_limit_are_read_whole_over_real_http(registry, asgi_server):
    response = post_chunked(asgi_server, [b'{"feature_name": "business_plan", ', b'"input_data": {"topic": "chunked"}}'])

    assert response.status_code == 201, response.text
    assert Job.objects.get(pk=response.json()["job_id"]).context["initial_input"] == {"topic": "chunked"}


@pytest.mark.django_db(transaction=True)
def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_read(registry, asgi_server, settings):
    import socket

    settings.CAO_MAX_BODY_BYTES = 1000
    with socket.create_connection(("127.0.0.1", asgi_server.port), timeout=10) as conn:
        conn.sendall(
            b"POST /api/v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 50000000\r\n\r\n"
        )
        reply = conn.recv(4096).decode()

    assert reply.startswith("HTTP/1.1 413") and "PAYLOAD_TOO_LARGE" in reply


@pytest.mark.parametrize(
    "input_data, fragment",
    [
        ({"text": "x" * 70_000}, "the limit is"),
        ({"a": {"b": {"c": {"d": 1}}}}, "nested more than 3 levels"),
        ({"text": "nul\u0000byte"}, "NUL"),
        ({"key\u0000": 1}, "NUL"),
    ],
)
def test_input_data_size_depth_and_content_are_limited(api, registry, settings, input_data, fragment):
    settings.CAO_MAX_INPUT_DEPTH = 3

    response = api.post("/api/v1/jobs", {"feature_name": "business_plan", "input_data": input_data}, format="json")

    assert response.status_code == 400 and error_code(response) == "INVALID_INPUT"
    assert fragment in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "body, code",
    [
        ("[" * 50_000 + "]" * 50_000, "MALFORMED_JSON"),
        ('{"feature_name": "business_plan", "input_data": {"x": NaN}}', "MALFORMED_JSON"),
        ('{"feature_name": "business_\\u0000plan", "input_data": {}}', "INVALID_INPUT"),
        ("\xff\xfe", "MALFORMED_JSON"),
    ],
)
def test_pathological_json_gets_a_400(api, registry, body, code):
    response = api.generic("POST", "/api/v1/jobs", body.encode("utf-8", "surrogatepass"), content_type="application/json")

    assert response.status_code == 400 and error_code(response) == code


def test_nul_in_query_parameters_is_a_400_not_a_crash(api, registry):
    response = api.get("/api/v1/jobs", {"feature_name": "a\u0000b"})

    assert response.status_code == 400 and error_code(response) == "INVALID_INPUT"


def test_requests_are_throttled_per_key_with_retry_after(registry, settings, api, staff_api):
    settings.CAO_THROTTLE_RATES = {"client": "3/min", "job_create": "none"}

    statuses = [api.get("/api/v1/features").status_code for _ in range(4)]

    assert statuses == [200, 200, 200, 429]
    limited = api.get("/api/v1/features")
    assert error_code(limited) == "THROTTLED" and int(limited["Retry-After"]) > 0
    assert staff_api.get("/api/v1/features").status_code == 200  # another key, its own budget
    assert APIClient().get("/api/v1/health").status_code == 200  # liveness is never throttled


def test_job_creation_has_its_own_lower_limit(registry, settings, api):
    settings.CAO_THROTTLE_RATES = {"client": "100/min", "job_create": "2/min"}

    statuses = [create(api).status_code for _ in range(3)]

    assert statuses == [201, 201, 429]
    assert api.get("/api/v1/jobs").status_code == 200


# --- CORS, CSRF and headers ------------------------------------------------------------------


def test_no_cross_origin_access_by_default(api, registry):
    response = api.get("/api/v1/features", HTTP_ORIGIN="https://app.example")

    assert "Access-Control-Allow-Origin" not in response


def test_configured_origins_may_call_the_api_but_not_the_admin(client, settings):
    settings.CORS_ALLOWED_ORIGINS = ["https://app.example"]

    preflight = client.options(
        "/api/v1/jobs",
        HTTP_ORIGIN="https://app.example",
        HTTP_ACCESS_CONTROL_REQUEST_METHOD="POST",
        HTTP_ACCESS_CONTROL_REQUEST_HEADERS="x-api-key, content-type, idempotency-key",
    )
    admin = client.get("/admin/login/", HTTP_ORIGIN="https://app.example")

    assert preflight["Access-Control-Allow-Origin"] == "https://app.example"
    assert "x-api-key" in preflight["Access-Control-Allow-Headers"]
    assert "Access-Control-Allow-Origin" not in admin


def test_api_keys_need_no_csrf_but_sessions_do(registry, make_staff):
    staff = make_staff("ops", "jobs.add_job")
    session = APIClient(enforce_csrf_checks=True)
    session.force_login(staff)

    refused = create(session)
    _, raw_key = ApiKey.objects.create_key(name="c")
    keyed = APIClient(enforce_csrf_checks=True)
    keyed.credentials(HTTP_X_API_KEY=raw_key)

    assert refused.status_code == 403 and "CSRF" in refused.json()["error"]["message"]
    assert create(keyed).status_code == 201


@pytest.mark.parametrize(
    "origin, host, secure, allowed",
    [
        ("http://localhost:8000", "localhost:8000", False, True),
        ("https://localhost:8443", "localhost:8443", True, True),
        ("http://localhost:9999", "localhost:8000", False, False),
        ("https://127.0.0.1:1", "127.0.0.1:8000", False, False),
        ("http://127.0.0.1:8000", "127.0.0.1:8000", True, False),
        ("http://localhost", "localhost:8000", False, False),
        ("http://evil.example:8000", "evil.example:8000", False, False),  # not in ALLOWED_HOSTS
        ("", "localhost:8000", False, False),
        ("null", "localhost:8000", False, False),
        ("https://app.example", "localhost:8000", False, True),  # CSRF_TRUSTED_ORIGINS
        ("https://ops.corp.example", "localhost:8000", False, True),  # https://*.corp.example
        ("http://ops.corp.example", "localhost:8000", False, False),
        ("https://corp.example.evil", "localhost:8000", False, False),
    ],
)
def test_the_origin_check_compares_scheme_host_and_port_as_csrf_does(settings, origin, host, secure, allowed):
    from common.origins import origin_allowed

    settings.CSRF_TRUSTED_ORIGINS = ["https://app.example", "https://*.corp.example"]

    assert origin_allowed(origin, host=host, secure=secure) is allowed


def test_the_websocket_origin_check_reads_the_scheme_behind_a_tls_proxy(settings):
    from common.origins import scope_origin_allowed

    headers = [(b"origin", b"https://localhost"), (b"host", b"localhost"), (b"x-forwarded-proto", b"https")]
    scope = {"type": "websocket", "scheme": "ws", "headers": headers}

    assert not scope_origin_allowed(scope)
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    assert scope_origin_allowed(scope)
    assert not scope_origin_allowed({**scope, "headers": [*headers[:2], (b"x-forwarded-proto", b"http")]})


def test_html_pages_carry_security_headers(client, make_staff):
    client.force_login(make_staff("ops", "jobs.view_job"))

    for url in ("/jobs/", "/admin/", "/api/v1/docs"):
        response = client.get(url)
        assert response.status_code == 200, url
        assert "default-src 'self'" in response["Content-Security-Policy"], url
        assert "frame-ancestors 'none'" in response["Content-Security-Policy"]
        # WebSockets and fetches go to the page's own origin only, not to any ws:/wss: host
        assert "connect-src 'self';" in response["Content-Security-Policy"] + ";", url
        assert response["X-Frame-Options"] == "DENY"
        assert response["X-Content-Type-Options"] == "nosniff"
        assert response["Referrer-Policy"] == "same-origin"


# --- What the probe found to hold: stored XSS, open redirects -------------------------------------

HOSTILE = '<script>alert(1)</script><img src=x onerror=alert(2)>"\'>'


def test_hostile_text_in_a_job_is_escaped_on_every_page(registry, client, django_user_model):
    # Given a job whose input, idempotency key, error and events carry markup (errors come from downstream)
    from jobs.events import append_events, event
    from orchestration.commands import submit_job

    job, _ = submit_job(feature_name="business_plan", input_data={"name": HOSTILE}, idempotency_key=HOSTILE[:60])
    fail_job(job.pk, retryable=True)
    Job.objects.filter(pk=job.pk).update(error_message=HOSTILE, error_code="X<b>Y")
    locked = Job.objects.get(pk=job.pk)
    append_events(locked, event("STEP_RETRYING", step_index=0, message=HOSTILE))
    locked.save(update_fields=["last_event_seq"])
    client.force_login(django_user_model.objects.create_superuser("root", "r@example.com", "pw"))

    # When ops open the pages and the admin that show it
    pages = {
        url: client.get(url).content.decode()
        for url in ("/jobs/", f"/jobs/{job.pk}/", "/admin/jobs/job/", f"/admin/jobs/job/{job.pk}/change/")
    }

    # Then the markup is shown as text, never as markup
    for url, page in pages.items():
        assert "<script>alert(1)" not in page and "<img src=x" not in page and "X<b>Y" not in page, url
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in pages[f"/jobs/{job.pk}/"]
    assert "&lt;script&gt;alert(1)" in pages[f"/admin/jobs/job/{job.pk}/change/"]


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/", "/\\evil.example/", "http:evil.example"])
def test_logins_and_admin_buttons_never_redirect_off_site(registry, client, django_user_model, target):
    from urllib.parse import quote

    django_user_model.objects.create_superuser("root", "r@example.com", "pw")
    login = client.post(f"/admin/login/?next={quote(target)}", {"username": "root", "password": "pw", "next": target})
    job = create_failed_job()
    operate = client.post(f"/admin/jobs/job/{job.pk}/operate/cancel/?_changelist_filters={quote(target)}")

    for response in (login, operate):
        assert response.status_code == 302
        assert response["Location"].startswith("/") and not response["Location"].startswith("//")
        assert "evil.example" not in response["Location"].split("?")[0]


def create_failed_job():
    from orchestration.commands import submit_job

    job, _ = submit_job(feature_name="business_plan", input_data={})
    fail_job(job.pk, retryable=True)
    return job


# --- Secrets ------------------------------------------------------------------------------


class EchoingService(http.server.BaseHTTPRequestHandler):
    """A careless downstream that echoes the credentials it got in its error."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps(
            {"status": "FAILED", "error": {"code": "BAD", "message": f"rejected {self.headers['Authorization']}"}}
        ).encode()
        self.send_response(400)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.django_db(transaction=True)
def test_secrets_never_reach_logs_errors_events_or_responses(registry, worker, settings, caplog, wait, staff_api):
    # Given an internal key, an API key, and a downstream that echoes what it is sent
    secret = "internal-secret-4f9a2c"
    settings.INTERNAL_API_KEY = secret
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), EchoingService)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings.CAO_SERVICE_URL_OVERRIDES = {"prompt_enhancer": f"http://127.0.0.1:{server.server_port}"}
    registry["prompt_enhancer"].auth_type = "bearer"
    registry["prompt_enhancer"].save()
    caplog.set_level(logging.DEBUG)
    raw_key = staff_api.api_key.raw_key

    # When a job fails against it and everything is inspected
    try:
        job_id = create(staff_api).json()["job_id"]
        wait(lambda: Job.objects.get(pk=job_id).status == JobStatus.FAILED, message="the job to fail")
        APIClient().get("/api/v1/jobs", HTTP_X_API_KEY=raw_key + "tampered")
        bodies = [
            staff_api.get(f"/api/v1/jobs/{job_id}").content.decode(),
            staff_api.get(f"/api/v1/jobs/{job_id}/events").content.decode(),
            staff_api.get("/api/v1/services").content.decode(),
        ]
    finally:
        server.shutdown()

    # Then neither secret appears anywhere
    job = Job.objects.get(pk=job_id)
    assert "rejected Bearer ***" in job.error_message
    stored = [job.error_message, json.dumps(job.context)]
    stored += [json.dumps(payload) for payload in JobEvent.objects.filter(job_id=job_id).values_list("payload", flat=True)]
    for text in [caplog.text, *bodies, *stored]:
        assert secret not in text
        assert raw_key not in text


# --- Header spellings -------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("header", ["X_API_Key", "X-Api_Key", "x_api_key"])
def test_underscore_spellings_of_the_key_header_authenticate_nothing(registry, asgi_server, header):
    # Given a valid key, and a proxy that would strip X-API-Key but not its underscore spellings
    _, raw_key = ApiKey.objects.create_key(name="c")
    url = f"{asgi_server.base_url}/api/v1/jobs"

    # When the key comes in an underscore spelling, and then in the real one
    aliased = requests.get(url, headers={header: raw_key}, timeout=10)
    proper = requests.get(url, headers={"X-API-Key": raw_key}, timeout=10)

    # Then only the real header authenticates
    assert aliased.status_code == 401 and aliased.json()["error"]["code"] == "NOT_AUTHENTICATED"
    assert proper.status_code == 200


@pytest.mark.django_db(transaction=True)
def test_an_underscore_spelling_cannot_pose_as_a_proxy_header(registry, asgi_server, settings):
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    _, raw_key = ApiKey.objects.create_key(name="c")

    response = requests.post(
        f"{asgi_server.base_url}/api/v1/jobs", json={"feature_name": "business_plan", "input_data": {}},
        headers={"X-API-Key": raw_key, "X_Forwarded_Proto": "https"}, timeout=10,
    )

    assert response.status_code == 201 and response.json()["monitor_url"].startswith("ws://")


# --- Request heads: bounded before the app runs -----------------------------------------------


class ApiProcess:
    """The API server started as a process, the way ``launcher`` starts it: the local stack or the container."""

    def __init__(self, launcher, tmp_path, env=None):
        import os
        import subprocess
        import sys
        from pathlib import Path

        from scripts.stack import stack_processes
        from scripts.testbed import free_port

        root = Path(__file__).resolve().parent.parent
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        bin_dir = os.path.dirname(sys.executable)
        self.env = {
            **os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CAO_ENV_FILE": "", "PYTHONUNBUFFERED": "1",
            "CAO_CHECK_BACKENDS_ON_START": "false", "SECRET_KEY": "test-secret", **(env or {}),
        }
        if launcher == "stack":
            (spec,) = [
                spec
                for spec in stack_processes(python=sys.executable, host="127.0.0.1", port=self.port, simulator_port=1)
                if spec.name == "api"
            ]
            command = spec.command
        else:  # the container's entrypoint, as docker-compose runs it
            command = ["sh", str(root / "docker-entrypoint.sh"), "api"]
            self.env.update(HOST="127.0.0.1", PORT=str(self.port), RUN_MIGRATIONS_ON_STARTUP="false")
        self.log_path = tmp_path / f"api-{launcher}.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=root, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def __enter__(self):
        from scripts.testbed import wait_until

        def healthy():
            assert self.process.poll() is None, self.log()
            try:
                return requests.get(f"{self.base_url}/api/v1/health", timeout=1).ok
            except requests.RequestException:
                return False

        wait_until(healthy, timeout=30, interval=0.1, message="the API process to answer")
        return self

    def __exit__(self, *exc_info):
        self.process.terminate()
        try:
            self.process.wait(10)
        except Exception:
            self.process.kill()
            self.process.wait(10)

    def log(self):
        return self.log_path.read_text(errors="replace")

    def peak_rss_kb(self):
        with open(f"/proc/{self.process.pid}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))


def send_oversized_header(port, megabytes):
    """Send a request whose one header is ``megabytes`` long; ``(status line or None, seconds to the answer)``."""
    import select
    import socket
    import time

    started = time.monotonic()
    chunk = b"a" * 65536
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
            for _ in range(megabytes * 16):
                sock.sendall(chunk)
                if select.select([sock], [], [], 0)[0]:
                    break  # the server answered before the end: stop sending
            else:
                sock.sendall(b"\r\n\r\n")
        except OSError:
            pass  # the server closed the connection: its answer, if any, is still readable
        try:
            reply = sock.recv(4096)
        except OSError:
            reply = b""
    return (reply.split(b"\r\n", 1)[0].decode() or None), time.monotonic() - started


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["stack", "entrypoint"])
def test_oversized_headers_get_431_at_once_and_other_requests_go_on(tmp_path, launcher):
    import time
    from concurrent.futures import ThreadPoolExecutor

    with ApiProcess(launcher, tmp_path) as api:
        rss_before = api.peak_rss_kb()
        # When three clients send 32 MB headers while another checks the health, over and over
        with ThreadPoolExecutor(4) as pool:
            floods = [pool.submit(lambda: [send_oversized_header(api.port, 32) for _ in range(3)]) for _ in range(3)]
            health = []
            while not all(flood.done() for flood in floods) or len(health) < 10:
                started = time.monotonic()
                ok = requests.get(f"{api.base_url}/api/v1/health", timeout=30).ok
                health.append((ok, time.monotonic() - started))
        answers = [answer for flood in floods for answer in flood.result()]
        near_limit = requests.get(f"{api.base_url}/api/v1/health", headers={"X-Fits": "a" * 60_000}, timeout=10)
        over_limit = requests.get(f"{api.base_url}/api/v1/health", headers={"X-Over": "a" * 70_000}, timeout=10)
        rss_growth_mb = (api.peak_rss_kb() - rss_before) / 1024

    # Then each oversized request is refused with 431 within a moment (about 5 ms measured),
    # the health checks are answered as usual, and the process does not grow
    assert {status for status, _ in answers} == {"HTTP/1.1 431 Request Header Fields Too Large"}, api.log()
    assert max(seconds for _, seconds in answers) < 1.0
    assert all(ok for ok, _ in health) and max(seconds for _, seconds in health) < 1.0, health
    assert near_limit.status_code == 200
    assert over_limit.status_code == 431 and over_limit.json()["error"] == {
        "code": "HEADERS_TOO_LARGE",
        "message": "The request line and headers exceed 65536 bytes.",
        "details": {"limit_bytes": 65536},
    }
    assert rss_growth_mb < 30, f"the API process grew by {rss_growth_mb:.0f} MB"


@pytest.mark.slow
def test_the_header_limit_is_a_setting(tmp_path):
    with ApiProcess("stack", tmp_path, env={"CAO_MAX_HEADER_BYTES": "4096"}) as api:
        fits = requests.get(f"{api.base_url}/api/v1/health", headers={"X-Fits": "a" * 3000}, timeout=10)
        over = requests.get(f"{api.base_url}/api/v1/health", headers={"X-Over": "a" * 5000}, timeout=10)

    assert fits.status_code == 200
    assert over.status_code == 431 and over.json()["error"]["details"] == {"limit_bytes": 4096}


# --- Credentials in the servers' logs -----------------------------------------------------------


@pytest.mark.parametrize(
    "line, masked",
    [
        ('"WebSocket /ws/1b0c?token=IjFiMGMi:1uX:sig-_x" [accepted]', '"WebSocket /ws/1b0c?token=***" [accepted]'),
        ("GET /api/v1/jobs?status=FAILED&api_key=anything HTTP/1.1", "GET /api/v1/jobs?status=FAILED&api_key=*** HTTP/1.1"),
        ("GET /api/v1/jobs?Token=x&after=3 HTTP/1.1", "GET /api/v1/jobs?Token=***&after=3 HTTP/1.1"),
        ("Sent job_id=1 step_index=0 token=5 to queue default", "Sent job_id=1 step_index=0 token=5 to queue default"),
    ],
)
def test_credential_query_parameters_are_masked(line, masked):
    from common.logs import redact

    assert redact(line) == masked


def test_uvicorns_access_lines_are_masked_and_still_format():
    from uvicorn.logging import AccessFormatter

    from common.logs import redact_loggers

    # Given uvicorn's access logger, as uvicorn configures it, with the filter the API process puts on it
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s', use_colors=False))
    access = logging.getLogger("uvicorn.access")
    saved = access.handlers, access.propagate, access.level
    access.handlers, access.propagate = [handler], False
    access.setLevel(logging.INFO)
    redact_loggers("uvicorn.access")
    _, raw_key = ApiKey.objects.create_key(name="c")
    try:
        # When a request with a key in its query string is logged
        access.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", f"/api/v1/jobs?api_key={raw_key}", "1.1", 200)
    finally:
        access.handlers, access.propagate, _ = saved
        access.setLevel(saved[2])

    # Then the line is uvicorn's, without the key
    assert stream.getvalue() == '127.0.0.1:5000 - "GET /api/v1/jobs?api_key=*** HTTP/1.1" 200 OK\n'


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_no_key_nor_monitor_token_in_any_process_log_after_a_run(testbed, tmp_path):
    import asyncio

    from websockets.asyncio.client import connect

    async def watch_to_the_end(monitor_url):
        async with connect(monitor_url, open_timeout=10) as socket:
            while json.loads(await asyncio.wait_for(socket.recv(), 60))["type"] != "JOB_COMPLETED":
                pass

    # Given the whole stack as processes, and a second API started as the container starts it
    # (uvicorn's access log on), both against the same database and Redis
    with testbed() as bed:
        shared = {name: bed.env[name] for name in ("DATABASE_URL", "REDIS_URL", "BROKER_URL", "SECRET_KEY")}
        with ApiProcess("entrypoint", tmp_path, env=shared) as container_api:
            # When a client uses both as clients do: a key in the header, a key where it does not
            # belong (the query string), and each job's monitor_url until the job completes
            secrets_seen = [bed.api_key]
            for base_url in (bed.base_url, container_api.base_url):
                created = requests.post(
                    f"{base_url}/api/v1/jobs", json={"feature_name": "viral_video", "input_data": {}},
                    headers={"X-API-Key": bed.api_key}, timeout=30,
                ).json()
                monitor_url = created["monitor_url"]
                secrets_seen.append(monitor_url.split("token=")[1])
                asyncio.run(watch_to_the_end(monitor_url))
                requests.get(f"{base_url}/api/v1/jobs?api_key={bed.api_key}", timeout=10)
                requests.get(f"{base_url}/api/v1/nowhere?token={secrets_seen[-1]}", timeout=10)
        container_log = container_api.log()
    logs = {path.name: path.read_text(errors="replace") for path in (tmp_path / "logs").glob("*.log")}
    logs["container api"] = container_log

    # Then no process logged a key or a token, though the lines that carried them were logged
    assert {"api.log", "worker_default.log", "worker_heavy.log", "scheduler.log", "simulator.log"} <= set(logs)
    for name, text in logs.items():
        for secret in secrets_seen:
            assert secret not in text, f"{name} has {secret[:12]}…"
            assert secret.rsplit(":", 1)[-1] not in text, f"{name} has a token's signature"
    assert "?token=***" in logs["api.log"] and "?token=***" in logs["container api"]
    assert "api_key=***" in logs["container api"]


# --- Admin logins ---------------------------------------------------------------------------------


def admin_login(session, base_url, username, password):
    session.get(f"{base_url}/admin/login/", timeout=10)
    return session.post(
        f"{base_url}/admin/login/",
        data={"username": username, "password": password, "next": "/admin/",
              "csrfmiddlewaretoken": session.cookies.get("csrftoken", "")},
        timeout=10,
        allow_redirects=False,
    )


@pytest.mark.django_db(transaction=True)
def test_repeated_failed_admin_logins_are_locked_out_with_429(asgi_server, make_staff, settings):
    # Given a staff account, and a limit of 5 failures per username and address
    settings.AXES_FAILURE_LIMIT = 5
    make_staff("ops", "jobs.view_job", password="the-right-one")
    session = requests.Session()

    # When someone keeps guessing its password
    guesses = [admin_login(session, asgi_server.base_url, "ops", f"guess-{n}").status_code for n in range(8)]
    right_one = admin_login(session, asgi_server.base_url, "ops", "the-right-one")

    # Then the guesses after the fifth get 429, even the right password, while other accounts log in
    assert guesses == [200] * 4 + [429] * 4
    assert right_one.status_code == 429 and "too many login attempts" in right_one.text
    make_staff("oncall", password="theirs")
    assert admin_login(requests.Session(), asgi_server.base_url, "oncall", "theirs").status_code == 302


@pytest.mark.django_db(transaction=True)
def test_a_successful_login_resets_the_failure_count(asgi_server, make_staff, settings):
    settings.AXES_FAILURE_LIMIT = 3
    make_staff("ops", password="pw-right")
    session = requests.Session()

    before = [admin_login(session, asgi_server.base_url, "ops", "wrong").status_code for _ in range(2)]
    assert admin_login(session, asgi_server.base_url, "ops", "pw-right").status_code == 302
    after = [admin_login(requests.Session(), asgi_server.base_url, "ops", "wrong").status_code for _ in range(2)]

    assert before == after == [200, 200]
