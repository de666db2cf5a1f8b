"""Small shared pieces: side effects after commit, the registry cache."""

import pytest
from django.db import DatabaseError, transaction

from common.after_commit import after_commit
from common.row_cache import cached


@pytest.mark.django_db(transaction=True)
def test_a_failing_side_effect_after_commit_neither_raises_nor_stops_the_others(caplog):
    ran = []

    def explode(reason):
        raise RuntimeError(reason)

    with transaction.atomic():
        after_commit(explode, "broker down")
        after_commit(ran.append, "next message")

    assert ran == ["next message"]
    assert "explode" in caplog.text and "broker down" in caplog.text


@pytest.mark.django_db(transaction=True)
def test_side_effects_of_a_rolled_back_transaction_never_run():
    ran = []
    with pytest.raises(ValueError), transaction.atomic():
        after_commit(ran.append, "message")
        raise ValueError("rolled back")

    assert ran == []


def test_the_registry_cache_rereads_after_its_age_and_serves_stale_rows_while_the_database_is_down(settings):
    settings.CAO_REGISTRY_CACHE_S = 1.0
    now = [100.0]
    reads = []

    def load_ok():
        reads.append("read")
        return f"row {len(reads)}"

    def load_down():
        raise DatabaseError("server closed the connection unexpectedly")

    assert cached(("test", 1), load_ok, clock=lambda: now[0]) == "row 1"
    assert cached(("test", 1), load_ok, clock=lambda: now[0]) == "row 1"  # fresh: no read
    now[0] += 2
    assert cached(("test", 1), load_ok, clock=lambda: now[0]) == "row 2"
    now[0] += 2
    assert cached(("test", 1), load_down, clock=lambda: now[0]) == "row 2"
    with pytest.raises(DatabaseError):
        cached(("test", "never read"), load_down, clock=lambda: now[0])
