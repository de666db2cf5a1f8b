"""A green worker's OS thread (the event publisher's loop) and its greenlets live together safely.

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
import asyncio, concurrent.futures, json, socket, threading, time
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
results["resolved"] = future.result(timeout=30)

# While the loop runs in its thread, this greenlet is not inside a running loop.
try:
    asyncio.get_running_loop()
    results["greenlet_sees_a_running_loop"] = True
except RuntimeError:
    results["greenlet_sees_a_running_loop"] = False

# The loop waits on a timer of its own while this thread blocks on it (with
# a deadline): a waiting loop uses next to no CPU meanwhile, a spinning one
# a whole core.
timer = concurrent.futures.Future()
cpu, wall = time.process_time(), time.monotonic()
loop.call_soon_threadsafe(loop.call_later, 0.5, timer.set_result, None)
timer.result(timeout=30)
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


LOGGING = r"""
from gevent import monkey; monkey.patch_all()
import _thread, json, logging, sys
import gevent
from common import green

before = logging.StreamHandler(sys.stderr)  # a handler made before the green set-up (as Dramatiq's is)
logging.getLogger().addHandler(before)
green.prepare()
after = logging.StreamHandler(sys.stderr)
logging.getLogger("later").addHandler(after)
native = type(_thread.RLock())
locks_native = all(isinstance(handler.lock, native) for handler in (before, after))

# The publisher's OS thread and many greenlets log at once; everyone gets through.
log = logging.getLogger("green-test")
finished = monkey.get_original("_thread", "allocate_lock")()  # a real lock: released by the OS thread
finished.acquire()
def from_the_os_thread():
    for i in range(300):
        log.warning("os thread %d", i)
    finished.release()
green.start_os_thread(from_the_os_thread, name="logger")
def from_a_greenlet(n):
    for i in range(30):
        log.warning("greenlet %d %d", n, i)
        gevent.sleep(0)
gevent.joinall([gevent.spawn(from_a_greenlet, n) for n in range(20)], timeout=30)
print(json.dumps({"locks_native": locks_native, "thread_finished": finished.acquire(timeout=30)}))
"""


def test_a_green_process_logs_from_its_os_thread_and_its_greenlets_without_deadlock():
    done = subprocess.run(
        [sys.executable, "-c", LOGGING], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])

    assert result == {"locks_native": True, "thread_finished": True}
