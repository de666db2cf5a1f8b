"""The green workers' connection pool never opens more than MAX_CONNS connections.

Run in a process of its own, monkey-patched as a green worker is, with
psycopg2 made cooperative: opening a connection yields, which is what lets a
burst of greenlets past a pool's count before any connection is counted.
"""

import json
import subprocess
import sys

import pytest
from django.db import connection

from scripts.stack import ROOT

BURST = r"""
from gevent import monkey; monkey.patch_all()
from psycogreen.gevent import patch_psycopg; patch_psycopg()
import json, sys
import gevent
from common.green_postgres.base import BoundedConnectionPool

pool = BoundedConnectionPool(dsn=sys.argv[1], MAX_CONNS=4)
peak, done = 0, 0

def step():
    global peak, done
    connection = pool.get()
    peak = max(peak, pool.size)
    connection.cursor().execute("SELECT pg_sleep(0.01)")
    pool.put(connection)
    done += 1

gevent.joinall([gevent.spawn(step) for _ in range(60)])
# A connection that broke is forgotten and frees its place.
broken = pool.get()
broken.close()
pool.discard(broken)
again = [pool.get() for _ in range(4)]
print(json.dumps({"peak": peak, "done": done, "size_after_discard": pool.size}))
"""


@pytest.mark.django_db
def test_a_burst_of_greenlets_shares_at_most_max_conns_connections():
    database = connection.settings_dict  # the test database
    dsn = f"dbname={database['NAME']} user={database['USER']} host={database['HOST']} port={database['PORT'] or 5432}"
    done = subprocess.run(
        [sys.executable, "-c", BURST, dsn], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])

    assert result["done"] == 60
    assert 1 <= result["peak"] <= 4
    assert result["size_after_discard"] <= 4
