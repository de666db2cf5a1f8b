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


class _Call:
    """A Redis command that can ride in another command's round trip (a pipeline) or run on its own."""

    def queue(self, pipeline):
        raise NotImplementedError

    def run(self):
        """Run it on its own."""
        raise NotImplementedError

    def result(self, value):
        """What it returned, from the pipeline's reply for it (``raise_on_error=False``)."""
        if isinstance(value, Exception):
            raise value
        return value

    def outcome(self, *reply):
        """``result(reply)``, or ``run()`` without a reply: the value, or the exception it raised."""
        try:
            return self.result(*reply) if reply else self.run()
        except Exception as exc:
            return exc


class ScriptCall(_Call):
    """One call of a registered Lua script.

    ``queue(pipeline)`` adds it by its SHA alone: redis-py's own script
    support in pipelines asks the server which scripts it has first, which
    would cost the round trip saved. A server that does not know the script
    yet (it restarted, or never ran it) did not run it, so ``result`` runs
    it again on its own, which loads it.
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
        return super().result(value)


class CommandCall(_Call):
    """One plain command (``CommandCall(client, "PUBLISH", channel, data)``); run alone on ``client``."""

    def __init__(self, client, *args):
        self.client = client
        self.args = args

    def queue(self, pipeline):
        pipeline.execute_command(*self.args)

    def run(self):
        return self.client.execute_command(*self.args)
