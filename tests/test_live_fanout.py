"""Live progress across API processes: any of them serves any job's WebSocket or event stream.

The real stack in separate processes, with two API processes on their own
ports and no sticky routing: jobs are created through the first, and
watched through the second. Resyncs from the log are switched off, so what
a subscriber gets after its first replay can only have been pushed, from a
worker, through Redis, to the other process.
"""

import json
import threading
import time

import pytest
import requests
from websockets.sync.client import connect

from tests.job_api import create_job

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

JOBS = 4
FINAL = "JOB_COMPLETED"


def watch_websocket(url, seqs, connected_at):
    with connect(url, open_timeout=30) as socket:
        hello = json.loads(socket.recv(timeout=30))
        assert hello["type"] == "WS_CONNECTED"
        connected_at.append(hello["last_seq"])
        while True:
            event = json.loads(socket.recv(timeout=30))
            seqs.append(event["seq"])
            if event["type"] == FINAL:
                return


def watch_stream(url, seqs, connected_at):
    with requests.get(url, stream=True, timeout=30) as response:
        response.raise_for_status()
        for line in response.iter_lines(decode_unicode=True):
            if line.startswith("data: "):
                event = json.loads(line[len("data: "):])
                seqs.append(event["seq"])
                if event["type"] == FINAL:
                    return


def test_jobs_created_on_one_api_process_are_watched_live_on_another(testbed):
    with testbed(api_processes=2, env={"CAO_WS_RESYNC_S": "0"}) as bed:
        # Given jobs created through the first API process, whose steps take a while
        bed.simulator.configure(latency={"*": "400ms"})
        other = bed.more_api_urls[0]
        jobs = [create_job(bed.base_url, bed.api_key, session=bed.session) for _ in range(JOBS)]

        # When each is watched through the second, by WebSocket and by event stream, at once
        received, connected_at, watchers = {}, {}, []
        for job_id, token in jobs:
            for kind, watch, url in (
                ("ws", watch_websocket, f"{other.replace('http', 'ws', 1)}/ws/{job_id}?token={token}"),
                ("sse", watch_stream, f"{other}/api/v1/jobs/{job_id}/stream?token={token}"),
            ):
                seqs, seen = received[(job_id, kind)], connected_at[(job_id, kind)] = [], []
                watchers.append(threading.Thread(target=watch, args=(url, seqs, seen), daemon=True))
        for watcher in watchers:
            watcher.start()
        deadline = time.monotonic() + 90  # a silent subscriber gives up after 30 s without an event
        for watcher in watchers:
            watcher.join(timeout=max(0.0, deadline - time.monotonic()))
        assert not any(watcher.is_alive() for watcher in watchers), "a subscriber never got JOB_COMPLETED"

        # Then every subscriber got every event of its job, once and in order
        for (job_id, kind), seqs in received.items():
            last = bed.sql("SELECT last_event_seq FROM jobs_job WHERE id = %s", [job_id])[0][0]
            assert seqs == list(range(1, last + 1)), (kind, seqs)
            if kind == "ws":
                # ... and the job was still running when the socket joined:
                # what came after its replay was pushed across processes
                assert connected_at[(job_id, kind)][0] < last
