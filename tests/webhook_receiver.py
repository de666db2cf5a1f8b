"""A real HTTP server that receives webhooks in a thread of the test: it records each request and answers
with the statuses it is told to, in turn (then 200)."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook


class Received:
    """One request as the receiver saw it."""

    def __init__(self, path, headers, body, status):
        self.path = path
        self.headers = headers
        self.body = body
        self.status = status

    @property
    def webhook_id(self):
        return self.headers["webhook-id"]

    def verify(self, secret):
        """The payload, verified with ``secret`` as a receiver does (standardwebhooks); raises when it does not."""
        return Webhook(secret).verify(self.body, self.headers)


class WebhookReceiver:
    """``with WebhookReceiver(statuses=[500, 500]) as receiver``: answers 500 twice, then 200."""

    def __init__(self, statuses=(), *, hold=None):
        self.statuses = list(statuses)
        self.received = []
        self.lock = threading.Lock()
        # While set, requests are held unanswered until it is cleared (or the test ends).
        self.hold = hold
        self.released = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length).decode()
                with receiver.lock:
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    receiver.received.append(
                        Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body, status)
                    )
                    holding = receiver.hold is not None and receiver.hold(len(receiver.received))
                if holding:
                    receiver.released.wait(60)
                self.send_response(status)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path="/hook", host="127.0.0.1"):
        return f"http://{host}:{self.port}{path}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.released.set()
        self.server.shutdown()
        self.server.server_close()

    def requests(self):
        with self.lock:
            return list(self.received)

    def accepted(self):
        """Requests answered 2xx."""
        return [request for request in self.requests() if 200 <= request.status < 300]
