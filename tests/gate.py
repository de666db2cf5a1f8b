"""A downstream service over real HTTP whose calls are held until the test opens the gate.

The simulator's latency knobs make a call last a while; a test that needs a
call to be in flight *for sure* while it looks at something (a lease, a
gauge, a live event stream) holds it here instead, so nothing depends on
how fast the machine is. Point a service at it with::

    settings.CAO_SERVICE_URL_OVERRIDES = {**settings.CAO_SERVICE_URL_OVERRIDES, "prompt_enhancer": gate.base_url}
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from scripts.testbed import wait_until


class GatedService:
    """Answers every step call with SUCCESS, once ``open()`` was called; until then calls wait."""

    def __init__(self, *, hold_limit_s=60.0):
        self.hold_limit_s = hold_limit_s
        self._gate = threading.Event()
        self._lock = threading.Lock()
        self._in_flight = 0
        self.calls = []  # Idempotency-Key of each call, in arrival order
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="gated-service", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self.close()

    @property
    def in_flight(self):
        with self._lock:
            return self._in_flight

    def open(self):
        """Let every held call answer, and every later one answer at once."""
        self._gate.set()

    def wait_in_flight(self, count, *, timeout=20.0):
        wait_until(lambda: self.in_flight == count, timeout=timeout, message=f"{count} call(s) held at the gate")

    def close(self):
        self.open()
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with service._lock:
                    service.calls.append(self.headers.get("Idempotency-Key"))
                    service._in_flight += 1
                try:
                    opened = service._gate.wait(service.hold_limit_s)
                finally:
                    with service._lock:
                        service._in_flight -= 1
                if opened:
                    step = json.loads(body or b"{}").get("meta", {}).get("step_index")
                    self._reply(200, {"status": "SUCCESS", "data": {"gated": True, "step_index": step}})
                else:  # a test that never opened the gate: fail the call rather than hang the worker
                    self._reply(503, {"status": "FAILED", "error": {"code": "GATE_NEVER_OPENED"}})

            def _reply(self, status, payload):
                content = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def log_message(self, *args):
                pass

        return Handler
