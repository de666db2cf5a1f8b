"""One Redis client (and connection pool) per process for leases and markers."""

import threading

import redis
from django.conf import settings

_clients = {}
_lock = threading.Lock()


def get_redis():
    """The process-wide client for ``settings.REDIS_URL``; safe to share across threads."""
    url = settings.REDIS_URL
    client = _clients.get(url)
    if client is None:
        with _lock:
            client = _clients.get(url)
            if client is None:
                client = redis.Redis.from_url(
                    url,
                    socket_connect_timeout=settings.CAO_REDIS_TIMEOUT_S,
                    socket_timeout=settings.CAO_REDIS_TIMEOUT_S,
                    health_check_interval=30,
                    decode_responses=True,
                )
                _clients[url] = client
    return client


class ScriptCall:
    """One call of a registered Lua script, to ride in another command's round trip.

    ``queue(pipeline)`` adds it by its SHA alone: redis-py's own script
    support in pipelines asks the server which scripts it has first, which
    would cost the round trip saved. ``result(value)`` takes what the
    pipeline returned for it (with ``raise_on_error=False``); a server that
    does not know the script yet (it restarted, or never ran it) did not run
    it, so it is run again on its own, which loads it.
    """

    def __init__(self, script, keys, args):
        self.script = script
        self.keys = list(keys)
        self.args = list(args)

    def queue(self, pipeline):
        pipeline.evalsha(self.script.sha, len(self.keys), *self.keys, *self.args)

    def run(self):
        """Run it on its own (the script's own client)."""
        return self.script(keys=self.keys, args=self.args)

    def result(self, value):
        if isinstance(value, redis.exceptions.NoScriptError):
            return self.run()
        if isinstance(value, Exception):
            raise value
        return value

    def outcome(self, *reply):
        """``result(reply)``, or ``run()`` without a reply: the value, or the exception it raised."""
        try:
            return self.result(*reply) if reply else self.run()
        except Exception as exc:
            return exc
