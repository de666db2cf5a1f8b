"""Running the simulator app under uvicorn, in this process."""

import ipaddress
import socket

import uvicorn

from simulator.app import SimulatorApp
from simulator.state import SimulatorState

DEFAULT_GRACEFUL_TIMEOUT_S = 5
# Longer than any client's pool idle time, so a reused connection is rarely
# closed under a request that is being sent (a spurious connection error).
DEFAULT_KEEP_ALIVE_S = 75


def service_env_name(service):
    """The gateway's base-URL override variable of ``service``, e.g. FAST_CHAT_LLM_URL."""
    return f"{service.upper()}_URL"


def service_urls(root_url, services):
    return {service: f"{root_url}/{service}" for service in services}


def bind_socket(host, port, *, backlog=2048):
    """A listening TCP socket on ``host:port`` (port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def root_url(sock):
    """``http://host:port`` of a bound socket; a wildcard address shows as loopback."""
    host, port = sock.getsockname()[:2]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None and address.is_unspecified:
        host = "127.0.0.1" if address.version == 4 else "::1"
        address = ipaddress.ip_address(host)
    if address is not None and address.version == 6:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def app_build(
    services,
    *,
    config=None,
    api_key=None,
    api_key_header="X-API-Key",
    execute_path="/v1/execute",
    request_log_size=1000,
    rng=None,
):
    """A fresh SimulatorApp with its own state."""
    state = SimulatorState(services, config=config, request_log_size=request_log_size)
    return SimulatorApp(state, api_key=api_key, api_key_header=api_key_header, execute_path=execute_path, rng=rng)


class SimulatorServer(uvicorn.Server):
    """A uvicorn server that wakes the app's sleeping calls as soon as shutdown starts."""

    def __init__(
        self,
        app,
        *,
        access_log=False,
        graceful_timeout_s=DEFAULT_GRACEFUL_TIMEOUT_S,
        keep_alive_s=DEFAULT_KEEP_ALIVE_S,
        loop="auto",
    ):
        config = uvicorn.Config(
            app,
            lifespan="off",
            access_log=access_log,
            # Leave logging to the host process (Django's LOGGING, or pytest).
            log_config=None,
            timeout_graceful_shutdown=graceful_timeout_s,
            timeout_keep_alive=keep_alive_s,
            loop=loop,
        )
        super().__init__(config)
        self.simulator_app = app

    async def shutdown(self, sockets=None):
        self.simulator_app.close()
        await super().shutdown(sockets=sockets)

    def abort_connections(self):
        """Drop every open connection at once, like a killed process (call from the server's loop)."""
        for connection in list(self.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.abort()
