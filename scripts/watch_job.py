"""Follow a job live over its WebSocket: `python scripts/watch_job.py MONITOR_URL`.

Prints every event until the job completes, fails or is cancelled, and
reconnects with ``?after=<last seq>`` if the connection drops. Exit status:
0 completed, 1 failed or cancelled, 2 could not connect.
"""

import argparse
import asyncio
import json
import sys
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

FINAL = {"JOB_COMPLETED": 0, "JOB_ERROR": 1, "JOB_CANCELLED": 1}


def with_after(url, after):
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "after"] + [("after", str(after))]
    return urlunsplit(parts._replace(query=urlencode(query)))


def describe(event):
    step = ""
    if "step_index" in event:
        step = f"[{event['step_index'] + 1}/{event['total_steps']}] {event['step_name']:<16} "
    return f"#{event['seq']:<3} {event['type']:<16} {step}{event.get('message', '')}"


# A silent socket is asked for news this often (the server answers a ping
# with whatever its log holds that was not sent yet, then a pong).
PING_AFTER_S = 15.0


async def watch(url, *, out=print, timeout=None, ping_after_s=PING_AFTER_S):
    """Print events until the job ends; returns the exit status.

    ``timeout`` bounds the whole watch, whatever state it is in: connecting,
    reconnecting, or connected to a job that says nothing.
    """
    try:
        async with asyncio.timeout(timeout):
            return await _follow(url, out=out, ping_after_s=ping_after_s)
    except TimeoutError:
        out("timed out")
        return 2


async def _follow(url, *, out, ping_after_s):
    last_seq, failures = 0, 0
    while True:
        try:
            async with connect(with_after(url, last_seq), open_timeout=10) as socket:
                failures = 0
                while True:
                    try:
                        raw = await asyncio.wait_for(socket.recv(), ping_after_s)
                    except asyncio.TimeoutError:
                        await socket.send(json.dumps({"type": "ping"}))
                        continue
                    event = json.loads(raw)
                    if event["type"] == "pong":
                        continue
                    if event["type"] == "WS_CONNECTED":
                        if last_seq == 0:
                            out(f"connected: job {event['job_id']} is {event['status']} "
                                f"({event['total_steps']} steps)")
                        continue
                    if event["seq"] <= last_seq:
                        continue
                    last_seq = event["seq"]
                    out(describe(event))
                    if event["type"] in FINAL:
                        return FINAL[event["type"]]
        except ConnectionClosed as closed:
            if closed.rcvd and closed.rcvd.code in (4400, 4401, 4404):
                out(f"refused: close code {closed.rcvd.code} ({closed.rcvd.reason or 'see README'})")
                return 2
        except (OSError, InvalidHandshake, InvalidURI, asyncio.TimeoutError) as error:
            failures += 1
            if failures > 5:
                out(f"could not connect: {error}")
                return 2
        await asyncio.sleep(min(5.0, 0.2 * 2**failures))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("monitor_url", help="the monitor_url from POST /api/v1/jobs")
    parser.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    args = parser.parse_args(argv)
    return asyncio.run(watch(args.monitor_url, out=lambda line: print(line, flush=True), timeout=args.timeout))


if __name__ == "__main__":
    sys.exit(main())
