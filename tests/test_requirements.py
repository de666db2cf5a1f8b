"""Missing test requirements skip locally, fail under CI=true, and never hide a misconfiguration."""

import socket

import pytest

import tests.conftest as conftest
from scripts import local_backends
from tests.browser import require_chromium
from tests.requirements import in_ci, require

Skipped = pytest.skip.Exception
Failed = pytest.fail.Exception


def outcome(call, *args):
    """("ran" | "skipped" | "failed", message) of ``call(*args)``, caught so a wrong skip cannot pass as a skip."""
    try:
        call(*args)
    except Skipped as exc:
        return "skipped", str(exc)
    except Failed as exc:
        return "failed", str(exc)
    return "ran", ""


def closed_port():
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rabbitmq_answers():
    host, port = "127.0.0.1", 5672
    return local_backends.port_open(host, port, timeout=1.0)


@pytest.mark.parametrize(
    "environ, ci",
    [
        ({}, False),
        ({"CI": ""}, False),
        ({"CI": "false"}, False),
        ({"CI": "0"}, False),
        ({"CI": "true"}, True),
        ({"CI": "TRUE"}, True),
        ({"CI": "1"}, True),
        ({"CI": "yes"}, True),
    ],
)
def test_ci_is_recognised_from_the_environment(environ, ci):
    assert in_ci(environ) is ci


def test_a_met_requirement_lets_the_test_run():
    assert outcome(require, True, "never shown") == ("ran", "")


def test_a_missing_requirement_skips_with_its_reason_outside_ci():
    assert outcome(lambda: require(False, "no widget here", environ={})) == ("skipped", "no widget here")


def test_a_missing_requirement_fails_with_its_reason_under_ci():
    kind, message = outcome(lambda: require(False, "no widget here", environ={"CI": "true"}))

    assert kind == "failed"
    assert message.startswith("no widget here") and "CI=true" in message


def test_a_missing_chromium_skips_locally_and_fails_under_ci(monkeypatch, tmp_path):
    missing = str(tmp_path / "no-chromium")

    monkeypatch.delenv("CI", raising=False)
    local = outcome(require_chromium, missing)
    monkeypatch.setenv("CI", "true")
    ci = outcome(require_chromium, missing)

    assert local[0] == "skipped" and ci[0] == "failed"
    assert f"Chromium not found at {missing}" in local[1] and f"Chromium not found at {missing}" in ci[1]


def test_an_unreachable_rabbitmq_skips_locally_and_fails_under_ci(monkeypatch):
    monkeypatch.setattr(conftest, "RABBITMQ_URL", f"amqp://guest:guest@127.0.0.1:{closed_port()}/%2F")

    monkeypatch.delenv("CI", raising=False)
    local = outcome(conftest.rabbitmq_broker)
    monkeypatch.setenv("CI", "true")
    ci = outcome(conftest.rabbitmq_broker)

    assert local[0] == "skipped" and ci[0] == "failed"
    assert "RabbitMQ not reachable at 127.0.0.1:" in local[1] and "RabbitMQ not reachable at 127.0.0.1:" in ci[1]


@pytest.mark.parametrize(
    "url, reason",
    [
        ("amqp://guest:not-the-password@127.0.0.1:5672/%2F", "ProbableAuthenticationError"),
        ("amqp://guest:guest@127.0.0.1:5672/no-such-vhost", "ProbableAccessDeniedError"),
    ],
)
def test_a_rabbitmq_refusing_the_login_is_an_error_not_a_skip(monkeypatch, url, reason):
    require(rabbitmq_answers(), "RabbitMQ not reachable at 127.0.0.1:5672; `make test` starts it")
    monkeypatch.setattr(conftest, "RABBITMQ_URL", url)
    monkeypatch.delenv("CI", raising=False)

    kind, message = outcome(conftest.rabbitmq_broker)

    assert kind == "failed", message
    assert "refused the login" in message and reason in message


# --- make test starts RabbitMQ (scripts/local_backends.py) ------------------


class FakeRabbitmq:
    """Stands in for ``rabbitmq-server -detached``: starting it opens a real listening socket."""

    def __init__(self):
        self.port = closed_port()
        self.starts = 0
        self.sock = None

    def start(self):
        self.starts += 1
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen()

    def close(self):
        if self.sock:
            self.sock.close()


@pytest.fixture
def fake_rabbitmq():
    server = FakeRabbitmq()
    yield server
    server.close()


def test_an_installed_but_stopped_rabbitmq_is_started(fake_rabbitmq, capsys):
    url = f"amqp://guest:guest@127.0.0.1:{fake_rabbitmq.port}/%2F"

    warning = local_backends.ensure_rabbitmq(
        url, which=lambda name: f"/usr/sbin/{name}", start=fake_rabbitmq.start, login_problem=lambda url: None,
        start_seconds=5,
    )

    assert warning is None and fake_rabbitmq.starts == 1
    assert "RabbitMQ is not running" in capsys.readouterr().out


def test_a_running_rabbitmq_is_not_started_again(fake_rabbitmq):
    fake_rabbitmq.start()
    url = f"amqp://guest:guest@127.0.0.1:{fake_rabbitmq.port}/%2F"

    local_backends.ensure_rabbitmq(url, which=lambda name: "/usr/sbin/" + name, start=pytest.fail,
                                   login_problem=lambda url: None)

    assert fake_rabbitmq.starts == 1


def test_a_missing_rabbitmq_is_reported_clearly_without_stopping_the_run(fake_rabbitmq):
    url = f"amqp://guest:guest@127.0.0.1:{fake_rabbitmq.port}/%2F"

    warning = local_backends.ensure_rabbitmq(url, which=lambda name: None, start=pytest.fail)

    assert "RabbitMQ is not installed" in warning and "fail under CI=true" in warning
    assert "apt install rabbitmq-server" in warning


def test_a_rabbitmq_that_never_starts_listening_is_an_error(fake_rabbitmq):
    url = f"amqp://guest:guest@127.0.0.1:{fake_rabbitmq.port}/%2F"

    with pytest.raises(local_backends.Problem, match="did not start listening .* within 1 s"):
        local_backends.ensure_rabbitmq(url, which=lambda name: name, start=lambda: None, start_seconds=1)


def test_wrong_rabbitmq_credentials_stop_make_test_with_the_reason():
    require(rabbitmq_answers(), "RabbitMQ not reachable at 127.0.0.1:5672; `make test` starts it")

    with pytest.raises(local_backends.Problem, match=r"guest:\*\*\*@127.0.0.1:5672.* refused the login"):
        local_backends.ensure_rabbitmq("amqp://guest:wrong@127.0.0.1:5672/%2F")
