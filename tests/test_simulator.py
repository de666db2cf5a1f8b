"""The downstream service simulator: contract checks, knobs, control API and helpers.

Real HTTP against a simulator served from a background thread (fast), plus a
few tests of the subprocess helper and the management command. No database.
"""

import asyncio
import json
import threading
import time

import pytest
import requests
from django.core.management import CommandError, call_command

from simulator.decisions import decide_execute
from simulator.errors import ControlError, KnobError
from simulator.knobs import (
    FOREVER_S,
    Fail,
    Hang,
    Latency,
    Malformed,
    ServiceKnobs,
    parse_changes,
    parse_duration,
    parse_knob,
)
from simulator.testing import REFERENCE_SERVICES, SimulatorProcess, SimulatorThread, wait_for

OUTPUT_KEY = {
    "prompt_enhancer": "enhanced_prompt",
    "fast_chat_llm": "text",
    "summarizer_pro": "summary",
    "video_gen_v2": "video_url",
    "email_notifier": "message_id",
}


def envelope(service, *, job_id="job-1", step_index=0, attempt=1, params=None, context=None):
    return {
        "meta": {
            "job_id": job_id,
            "step_index": step_index,
            "service_name": service,
            "attempt": attempt,
            "timestamp": "2025-01-01T00:00:00+00:00",
        },
        "payload": {
            "params": {"prompt": "a bakery in Lisbon"} if params is None else params,
            "context": context or {},
        },
    }


def call(sim, service, *, job_id="job-1", step_index=0, body=None, headers=None, timeout=5, **envelope_fields):
    """POST a step call; ``headers`` values of None drop a default header."""
    if body is None:
        body = envelope(service, job_id=job_id, step_index=step_index, **envelope_fields)
    all_headers = {"Idempotency-Key": f"{job_id}:{step_index}:{service}", **(headers or {})}
    return requests.post(sim.execute_url(service), json=body, headers=all_headers, timeout=timeout)


def error_of(response):
    body = response.json()
    assert body["status"] == "FAILED"
    return body["error"]


@pytest.fixture(scope="module")
def shared_sim():
    with SimulatorThread(seed=7) as sim:
        yield sim


@pytest.fixture
def sim(shared_sim):
    shared_sim.reset(config=True)
    return shared_sim


# --- Knob parsing (pure) --------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "text", "expected", "canonical"),
    [
        ("latency", "200ms", Latency(0.2), "200ms"),
        ("latency", "2s", Latency(2.0), "2s"),
        ("latency", "0", Latency(0.0), "0"),
        ("latency", "200ms~50ms", Latency(0.2, 0.05), "200ms~50ms"),
        ("latency", "1.5s", Latency(1.5), "1500ms"),
        ("fail", "503x2", Fail(503, count=2), "503x2"),
        ("fail", "400", Fail(400), "400"),
        ("fail", "429x0", Fail(429), "429"),
        ("hang", "30s", Hang(30.0), "30s"),
        ("hang", "30sx1", Hang(30.0, count=1), "30sx1"),
        ("hang", "", Hang(FOREVER_S), "1h"),
        ("hang", "x1", Hang(FOREVER_S, count=1), "1hx1"),
        ("malformed", "", Malformed("invalid_json"), "invalid_json"),
        ("malformed", "nostatusx2", Malformed("nostatus", count=2), "nostatusx2"),
        ("retry_after", "2s", None, "2s"),
        ("health_fail", "", None, "503"),
        ("health_fail", "500", None, "500"),
    ],
)
def test_knob_texts_parse_and_print_back(kind, text, expected, canonical):
    knob = parse_knob(kind, text if text else True)
    if expected is not None:
        assert knob == expected
    assert str(knob) == canonical
    assert parse_knob(kind, canonical) == knob


@pytest.mark.parametrize(
    ("kind", "text", "message"),
    [
        ("latency", "200", "needs a unit"),
        ("latency", "fast", "bad duration 'fast'"),
        ("latency", "1s~", "optional jitter"),
        ("fail", "200", "from 400 to 599"),
        ("fail", "503x", "the count goes last"),
        ("fail", "x2", "give a status"),
        ("malformed", "weird", "use one of invalid_json, nostatus, empty"),
        ("hang", "soon", "bad duration 'soon'"),
        ("nap", "1s", "unknown knob 'nap'"),
    ],
)
def test_bad_knob_texts_are_refused_with_a_clear_message(kind, text, message):
    with pytest.raises(KnobError, match=message):
        parse_knob(kind, text)


def test_star_expands_to_every_service_and_named_services_win():
    changes = parse_changes({"latency": {"fast_chat_llm": "1s", "*": "50ms"}}, REFERENCE_SERVICES)

    assert changes[("fast_chat_llm", "latency")] == Latency(1.0)
    assert changes[("email_notifier", "latency")] == Latency(0.05)
    with pytest.raises(KnobError, match="unknown service 'nope'"):
        parse_changes({"fail": {"nope": "503"}}, REFERENCE_SERVICES)


def test_decide_execute_adds_hang_to_latency_and_prefers_fail_over_malformed():
    knobs = ServiceKnobs(
        latency=Latency(0.1), hang=Hang(5.0, count=1), fail=Fail(503, count=1), malformed=Malformed(count=2)
    )
    rng = None  # no jitter, so never drawn

    first = decide_execute(knobs, {"hang": 1, "fail": 1, "malformed": 1}, rng=rng)
    second = decide_execute(knobs, {"hang": 2, "fail": 2, "malformed": 2}, rng=rng)
    third = decide_execute(knobs, {"hang": 3, "fail": 3, "malformed": 3}, rng=rng)

    assert (first.delay_s, first.status, first.retryable, first.hang) == (5.1, 503, True, True)
    assert (second.delay_s, second.status, second.malformed) == (0.1, 200, "invalid_json")
    assert (third.status, third.malformed) == (200, None)
    assert parse_duration("2m") == 120


# --- Success replies ---------------------------------------------------------------


@pytest.mark.parametrize("service", REFERENCE_SERVICES)
def test_each_service_answers_success_with_its_own_data(sim, service):
    response = call(sim, service)

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "SUCCESS"
    assert isinstance(body["data"][OUTPUT_KEY[service]], str) and body["data"][OUTPUT_KEY[service]]
    assert isinstance(body["metrics"]["execution_time_ms"], int)
    # Deterministic: the same call gets the same data.
    assert call(sim, service).json()["data"] == body["data"]


def test_email_notifier_reports_sent_and_later_steps_build_on_the_context(sim):
    enhanced = call(sim, "prompt_enhancer").json()["data"]["enhanced_prompt"]
    context = {"step_0_prompt_enhancer": {"status": "SUCCESS", "data": {"enhanced_prompt": enhanced}}}

    text = call(sim, "fast_chat_llm", step_index=1, context=context).json()["data"]["text"]
    context["step_1_fast_chat_llm"] = {"status": "SUCCESS", "data": {"text": text}}
    summary = call(sim, "summarizer_pro", step_index=2, context=context).json()["data"]["summary"]
    email = call(sim, "email_notifier", step_index=3, context=context, params={"prompt": "x", "email": "a@b.c"})

    assert "a bakery in Lisbon" in enhanced
    assert enhanced[:100] in text
    assert summary and summary in text
    assert email.json()["data"]["sent"] is True
    assert email.json()["data"]["recipient"] == "a@b.c"


# --- Request contract ----------------------------------------------------------------


def _without_meta(service):
    body = envelope(service)
    del body["meta"]
    return body


@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [
        (_without_meta("fast_chat_llm"), None, "meta must be an object"),
        (envelope("summarizer_pro"), None, "meta.service_name is 'summarizer_pro' but this is 'fast_chat_llm'"),
        (envelope("fast_chat_llm"), {"Idempotency-Key": None}, "the Idempotency-Key header is missing"),
        (envelope("fast_chat_llm"), {"Idempotency-Key": "job-1:1:fast_chat_llm"}, "expected 'job-1:0:fast_chat_llm'"),
        (
            {**envelope("fast_chat_llm"), "payload": {"params": [], "context": {}}},
            None,
            "payload.params must be an object",
        ),
        ({"meta": {"service_name": "fast_chat_llm"}, "payload": {}}, None, "meta.job_id must be a non-empty string"),
    ],
)
def test_a_bad_envelope_is_answered_400_bad_envelope(sim, body, headers, message):
    response = call(sim, "fast_chat_llm", body=body, headers=headers)

    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "BAD_ENVELOPE"
    assert error["retryable"] is False
    assert message in error["message"]


def test_a_body_that_is_not_json_is_a_bad_envelope(sim):
    response = requests.post(
        sim.execute_url("fast_chat_llm"), data=b"{nope", headers={"Idempotency-Key": "j:0:fast_chat_llm"}, timeout=5
    )

    assert response.status_code == 400
    assert error_of(response)["message"] == "The body is not valid JSON."


def test_unknown_services_paths_and_methods_answer_json_errors(sim):
    unknown = requests.post(f"{sim.url}/no_such_service/v1/execute", json={}, timeout=5)
    wrong_path = requests.post(sim.base_url("fast_chat_llm") + "/v2/run", json={}, timeout=5)
    wrong_method = requests.get(sim.execute_url("fast_chat_llm"), timeout=5)

    assert unknown.status_code == 404
    assert "No simulated service named 'no_such_service'" in error_of(unknown)["message"]
    assert wrong_path.status_code == 404
    assert wrong_method.status_code == 405


@pytest.fixture(scope="module")
def keyed_sim():
    with SimulatorThread(api_key="s3cret", api_key_header="X-Internal-Key") as sim:
        yield sim


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"X-API-Key": "s3cret"}, 401),  # not the configured header name
        ({"Authorization": "Bearer s3cret"}, 200),
        ({"X-Internal-Key": "s3cret"}, 200),
        ({"x-internal-key": "s3cret"}, 200),
    ],
)
def test_a_simulator_with_an_api_key_requires_it(keyed_sim, headers, status):
    response = call(keyed_sim, "prompt_enhancer", headers=headers)

    assert response.status_code == status
    if status == 401:
        assert error_of(response) == {
            "code": "UNAUTHORIZED",
            "message": "Missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-Internal-Key: <key>'.",
            "retryable": False,
        }
    # Health checks stay open.
    assert requests.get(keyed_sim.base_url("prompt_enhancer") + "/health", timeout=5).status_code == 200


# --- Knobs over HTTP -------------------------------------------------------------------


def test_latency_delays_the_reply_at_least_as_configured(sim):
    sim.configure(latency={"fast_chat_llm": "300ms"})

    started = time.monotonic()
    response = call(sim, "fast_chat_llm")

    assert time.monotonic() - started >= 0.3
    assert response.json()["metrics"]["execution_time_ms"] >= 300
    assert sim.config()["latency"] == {"fast_chat_llm": "300ms"}


def test_fail_503x2_fails_the_first_two_calls_of_each_key_then_succeeds(sim):
    sim.configure(fail={"summarizer_pro": "503x2"})

    first_key = [call(sim, "summarizer_pro", job_id="a").status_code for _ in range(3)]
    other_key = call(sim, "summarizer_pro", job_id="b")

    assert first_key == [503, 503, 200]
    assert other_key.status_code == 503
    assert error_of(other_key) == {
        "code": "SERVICE_UNAVAILABLE",
        "message": "summarizer_pro failed on purpose with 503 (simulated).",
        "retryable": True,
    }


@pytest.mark.parametrize(
    ("status", "code", "retryable"),
    [
        (429, "RESOURCE_EXHAUSTED", True),
        (500, "INTERNAL_ERROR", True),
        (400, "INVALID_INPUT", False),
        (422, "UNPROCESSABLE", False),
    ],
)
def test_fail_without_a_count_always_fails_and_retryable_follows_the_status(sim, status, code, retryable):
    sim.configure(fail={"fast_chat_llm": str(status)})

    responses = [call(sim, "fast_chat_llm") for _ in range(3)]

    assert [response.status_code for response in responses] == [status] * 3
    assert error_of(responses[0])["code"] == code
    assert error_of(responses[0])["retryable"] is retryable


@pytest.mark.parametrize(("status", "sent"), [(429, "2.5"), (503, "2.5"), (500, None), (400, None)])
def test_retry_after_rides_on_the_429s_and_503s_of_fail(sim, status, sent):
    sim.configure(fail={"fast_chat_llm": str(status)}, retry_after={"fast_chat_llm": "2500ms"})

    response = call(sim, "fast_chat_llm")

    assert response.status_code == status
    assert response.headers.get("Retry-After") == sent


def test_retry_after_alone_changes_no_answer(sim):
    sim.configure(retry_after={"fast_chat_llm": "2s"})

    response = call(sim, "fast_chat_llm")

    assert response.status_code == 200 and "Retry-After" not in response.headers


def test_hang_outlasts_the_client_timeout_and_the_abandoned_call_leaves_in_flight(sim):
    sim.configure(hang={"video_gen_v2": "30sx1"})

    with pytest.raises(requests.ReadTimeout):
        call(sim, "video_gen_v2", timeout=0.3)

    # The simulator noticed the client left: the call is no longer in flight.
    stats = wait_for(
        lambda: (s := sim.stats("video_gen_v2"))["in_flight"] == 0 and s, message="abandoned call ended"
    )
    assert stats["status_counts"] == {"disconnected": 1}
    # Only the first call per key hangs.
    assert call(sim, "video_gen_v2", timeout=5).status_code == 200


@pytest.mark.parametrize(
    ("knob", "check"),
    [
        ("invalid_json", lambda r: pytest.raises(ValueError, r.json)),
        ("nostatus", lambda r: "status" not in r.json()),
        ("empty", lambda r: r.content == b""),
    ],
)
def test_malformed_answers_200_with_a_broken_body(sim, knob, check):
    sim.configure(malformed={"summarizer_pro": f"{knob}x1"})

    broken = call(sim, "summarizer_pro")
    fixed = call(sim, "summarizer_pro")

    assert broken.status_code == 200
    assert check(broken)
    assert fixed.json()["status"] == "SUCCESS"


def test_health_answers_ok_and_health_fail_and_health_hang_break_it(sim):
    health_url = sim.base_url("email_notifier") + "/health"
    assert requests.get(health_url, timeout=5).json() == {"ok": True, "service": "email_notifier"}

    sim.configure(health_fail={"email_notifier": "503"})
    failing = requests.get(health_url, timeout=5)
    sim.configure(health_fail={"email_notifier": None}, health_hang={"email_notifier": "30s"})

    assert failing.status_code == 503
    assert failing.json()["ok"] is False
    with pytest.raises(requests.ReadTimeout):
        requests.get(health_url, timeout=0.3)
    assert sim.stats("email_notifier")["health_status_counts"]["503"] == 1


# --- Control API -------------------------------------------------------------------------


def test_config_changes_merge_at_runtime_and_null_removes_a_knob(sim):
    sim.configure(latency={"*": "10ms"}, fail={"summarizer_pro": "503x2"})
    config = sim.configure(latency={"fast_chat_llm": "1s~100ms"}, fail={"summarizer_pro": None})

    assert config["latency"]["fast_chat_llm"] == "1s~100ms"
    assert config["latency"]["email_notifier"] == "10ms"
    assert config["fail"] == {}
    assert sim.config() == config
    assert call(sim, "summarizer_pro").status_code == 200


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"fail": {"summarizer_pro": "200"}}, "fail of summarizer_pro: bad fail status '200'"),
        ({"latency": {"nope": "1s"}}, "latency of nope: unknown service 'nope'"),
        ({"latency": ["fast_chat_llm"]}, "latency must map service names to values"),
    ],
)
def test_bad_config_changes_are_refused_and_change_nothing(sim, knobs, message):
    with pytest.raises(ControlError, match="answered 400") as raised:
        sim._call("POST", "/config", json=knobs)

    assert message in str(raised.value)
    assert sim.config()["fail"] == {} and sim.config()["latency"] == {}


def test_stats_count_in_flight_calls_and_calls_per_key(sim):
    sim.configure(latency={"fast_chat_llm": "1s"})
    results = []

    def one_call(index):
        results.append(call(sim, "fast_chat_llm", job_id=f"job-{index % 4}").status_code)

    threads = [threading.Thread(target=one_call, args=(index,)) for index in range(12)]
    for thread in threads:
        thread.start()

    during = wait_for(lambda: (s := sim.stats("fast_chat_llm"))["in_flight"] == 12 and s, message="12 in flight")
    for thread in threads:
        thread.join()
    after = sim.stats("fast_chat_llm")

    assert during["calls"] == 12
    assert results == [200] * 12
    assert (after["in_flight"], after["max_in_flight"], after["calls"]) == (0, 12, 12)
    assert after["calls_by_key"] == {f"job-{i}:0:fast_chat_llm": 3 for i in range(4)}
    assert after["status_counts"] == {"200": 12}


def test_hundreds_of_concurrent_calls_are_all_in_flight_at_once(sim):
    sim.configure(latency={"email_notifier": "1500ms"})
    host, port = sim.url.removeprefix("http://").rsplit(":", 1)

    async def one(index):
        body = json.dumps(envelope("email_notifier", job_id=f"burst-{index}")).encode()
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"POST /email_notifier/v1/execute HTTP/1.1\r\nHost: sim\r\nContent-Type: application/json\r\n"
            + f"Idempotency-Key: burst-{index}:0:email_notifier\r\nContent-Length: {len(body)}\r\n".encode()
            + b"Connection: close\r\n\r\n"
            + body
        )
        reply = await reader.read()
        writer.close()
        return int(reply.split(b" ", 2)[1])

    async def burst():
        return await asyncio.gather(*(one(index) for index in range(300)))

    statuses = asyncio.run(burst())

    assert statuses == [200] * 300
    assert sim.stats("email_notifier", keys=False)["max_in_flight"] == 300


def test_reset_clears_counters_log_and_per_key_counts_but_keeps_config(sim):
    sim.configure(fail={"prompt_enhancer": "503x1"})
    assert call(sim, "prompt_enhancer").status_code == 503
    assert call(sim, "prompt_enhancer").status_code == 200

    sim.reset()

    assert sim.stats("prompt_enhancer")["calls"] == 0
    assert sim.requests() == []
    assert call(sim, "prompt_enhancer").status_code == 503  # the key's count started over
    sim.reset(config=True)
    assert sim.config()["fail"] == {}


def test_requests_log_keeps_the_exact_envelope_and_headers(sim):
    sent = envelope("fast_chat_llm", job_id="job-9", step_index=1, attempt=2)
    call(sim, "fast_chat_llm", job_id="job-9", step_index=1, body=sent, headers={"X-Trace": "t1"})
    call(sim, "prompt_enhancer")
    requests.get(sim.base_url("fast_chat_llm") + "/health", timeout=5)

    [logged] = sim.requests("fast_chat_llm", kind="execute")

    assert logged["method"] == "POST"
    assert logged["path"] == "/fast_chat_llm/v1/execute"
    assert logged["json"] == sent
    assert logged["headers"]["idempotency-key"] == "job-9:1:fast_chat_llm"
    assert logged["headers"]["x-trace"] == "t1"
    assert logged["status"] == 200
    assert [entry["kind"] for entry in sim.requests("fast_chat_llm")] == ["execute", "health"]
    assert len(sim.requests(limit=1)) == 1
    assert sim.requests(limit=1)[0]["kind"] == "health"


def test_thread_kill_drops_open_connections_and_restart_reuses_the_port():
    with SimulatorThread(hang={"video_gen_v2": True}) as sim:
        port = sim.port
        failures = []

        def hanging_call():
            try:
                call(sim, "video_gen_v2", timeout=10)
            except requests.RequestException as exc:
                failures.append(exc)

        caller = threading.Thread(target=hanging_call)
        caller.start()
        wait_for(lambda: sim.stats("video_gen_v2")["in_flight"] == 1, message="call in flight")

        sim.kill()
        caller.join(5)
        sim.restart()

        assert isinstance(failures[0], requests.ConnectionError)
        assert sim.port == port
        assert sim.stats("video_gen_v2")["calls"] == 0


# --- Subprocess helper and management command ----------------------------------------------


def test_process_serves_on_a_free_port_survives_kill_and_restart_and_stops_cleanly():
    with SimulatorProcess(fail={"summarizer_pro": "503x1"}, hang={"video_gen_v2": True}) as sim:
        env = sim.env()
        expected = f"http://127.0.0.1:{sim.port}/summarizer_pro"
        assert env["SUMMARIZER_PRO_URL"] == sim.base_url("summarizer_pro") == expected
        assert set(env) == {f"{service.upper()}_URL" for service in REFERENCE_SERVICES}
        assert f"SUMMARIZER_PRO_URL={env['SUMMARIZER_PRO_URL']}" in sim.output()
        assert call(sim, "summarizer_pro").status_code == 503

        # Given a killed simulator, calls are refused...
        assert sim.kill() == -9
        with pytest.raises(requests.ConnectionError):
            call(sim, "summarizer_pro", timeout=2)
        # ...when it restarts, it is back on the same port with fresh counts and its startup knobs.
        port = sim.port
        sim.restart()
        assert sim.port == port
        assert sim.stats("summarizer_pro")["calls"] == 0
        assert call(sim, "summarizer_pro").status_code == 503

        # A call hanging during SIGTERM is answered at once and the process exits 0.
        answers = []
        hanging = threading.Thread(target=lambda: answers.append(call(sim, "video_gen_v2", timeout=10)))
        hanging.start()
        wait_for(lambda: sim.stats("video_gen_v2")["in_flight"] == 1, message="call in flight")
        assert sim.stop() == 0
        hanging.join(5)
        assert answers[0].status_code == 503
        assert error_of(answers[0])["code"] == "SHUTTING_DOWN"
        assert "Simulator stopped." in sim.output()


def test_process_with_a_bad_knob_fails_to_start_with_the_reason():
    sim = SimulatorProcess(latency={"fast_chat_llm": "200"})
    try:
        with pytest.raises(ControlError, match=r"--latency fast_chat_llm=200: duration '200' needs a unit"):
            sim.start()
    finally:
        sim.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fail", "nope=503"], "--fail nope=503: unknown service 'nope'"),
        (["--fail", "summarizer_pro"], "--fail summarizer_pro: fail needs a value"),
        (["--hang", "video_gen_v2=soon"], "bad duration 'soon'"),
        (["--malformed", "email_notifier=weird"], "bad malformed kind 'weird'"),
        (["--health-fail", "email_notifier=200"], "bad health_fail status '200'"),
        (["--extra-service", "Bad Name"], "--extra-service 'Bad Name'"),
    ],
)
def test_command_refuses_bad_knobs_before_listening(args, message):
    with pytest.raises(CommandError) as raised:
        call_command("simulate_services", "--port", "0", *args)

    assert message in str(raised.value)
