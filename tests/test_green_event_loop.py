"""The event publisher's asyncio loop in a green worker: its own OS thread, idle when idle.

In a process of its own, monkey-patched as a green worker is. A loop run by
a greenlet would make Django see every greenlet as async code; a loop in an
OS thread with gevent's patched selector spins at 100 % of a core and
cannot resolve host names.
"""

import json
import subprocess
import sys

from scripts.stack import ROOT

LOOP = r"""
from gevent import monkey; monkey.patch_all()
import asyncio, json, socket, threading, time
from common import green

assert green.active()
loop = green.new_event_loop()
results = {}

async def resolve():
    infos = await asyncio.get_running_loop().getaddrinfo("localhost", 80, type=socket.SOCK_STREAM)
    return bool(infos)

def run():
    asyncio.set_event_loop(loop)
    loop.run_forever()

green.start_os_thread(run, name="test-loop")
future = asyncio.run_coroutine_threadsafe(resolve(), loop)
deadline = time.monotonic() + 30
while not future.done() and time.monotonic() < deadline:
    time.sleep(0.01)
results["resolved"] = future.result(timeout=0)

# While the loop runs in its thread, this greenlet is not inside a running loop.
try:
    asyncio.get_running_loop()
    results["greenlet_sees_a_running_loop"] = True
except RuntimeError:
    results["greenlet_sees_a_running_loop"] = False

cpu, wall = time.process_time(), time.monotonic()
time.sleep(1.0)  # the loop waits for work
results["idle_cpu_share"] = (time.process_time() - cpu) / (time.monotonic() - wall)
print(json.dumps(results))
"""


def test_the_publisher_loop_of_a_green_worker_runs_apart_resolves_names_and_idles():
    done = subprocess.run([sys.executable, "-c", LOOP], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])

    assert result["resolved"] is True
    assert result["greenlet_sees_a_running_loop"] is False
    # A spinning loop keeps a whole core busy; a waiting one next to nothing.
    assert result["idle_cpu_share"] < 0.5, result
