"""How a job's state change reaches the database: under the row lock, or as one conditional statement.

The state machine in ``jobs.steps`` (and ``jobs.services``) changes a ``Job`` in memory and hands
what it writes (job fields, an attempt row, event rows) to a writer:

- ``LOCKED`` writes at once through the ORM, inside the caller's transaction,
  with the job row locked (``lock_job``). Every operation can use it.
- ``ConditionalWrite(job)`` collects the writes of one transition and sends
  them as one statement, which applies only if the job row still has the
  token, step state, status and last event seq it had when it was read. The
  engine's hot path reads the job without a lock and writes each transition
  in one round trip; when the row moved meanwhile (a cancel, a duplicate
  message, maintenance), nothing is written and the caller falls back to
  the locked path.

Every change to a job bumps at least one of those four columns, so a
conditional write can never overwrite a change it did not see, and event
seqs computed from the row that was read stay gapless and unique.

Either way, what must happen only once the write is durable (pushing
events, sending messages, logging the outcome) goes to ``after_commit``.
"""

import functools
import re

from django.db import connection, models

from common.after_commit import after_commit
from jobs.models import Job, JobEvent, StepAttempt


class LockedWriter:
    """Writes through the ORM at once; the caller holds the row lock in a transaction."""

    def create_attempt(self, attempt):
        attempt.save(force_insert=True)

    def finish_attempt(self, job, token, **values):
        StepAttempt.objects.filter(job=job, token=token).update(**values)

    def add_events(self, job, rows):
        JobEvent.objects.bulk_create(rows)

    def save(self, job, fields):
        job.save(update_fields=[*fields, "last_event_seq", "updated_at"])

    def after_commit(self, func, /, *args, **kwargs):
        after_commit(func, *args, **kwargs)

    def after_commit_first(self, func, /, *args, **kwargs):
        # Django runs commit hooks in the order they were registered.
        after_commit(func, *args, **kwargs)

    def execute(self):
        """Everything is written already; the transaction's commit makes it durable."""
        return True


LOCKED = LockedWriter()


class ConditionalWrite:
    """One transition of ``job``, written in one statement if the row has not moved since it was read.

    Build it before changing the job: it remembers the columns to check.
    Run outside a transaction, the statement commits by itself.
    """

    def __init__(self, job):
        self.job = job
        self._expected = (job.pk, job.step_token, job.step_state, job.status, job.last_event_seq)
        self._fields = []
        self._attempt = None
        self._finished = None
        self._events = []
        self._effects = []

    def create_attempt(self, attempt):
        self._attempt = attempt

    def finish_attempt(self, job, token, **values):
        self._finished = (token, values)

    def add_events(self, job, rows):
        self._events.extend(rows)

    def save(self, job, fields):
        self._fields.extend(name for name in fields if name not in self._fields)

    def after_commit(self, func, /, *args, **kwargs):
        self._effects.append((func, args, kwargs))

    def after_commit_first(self, func, /, *args, **kwargs):
        """Run ``func`` before the effects registered so far (e.g. the next step's message before the events' push)."""
        self._effects.insert(0, (func, args, kwargs))

    def execute(self):
        """Write it all if the row is unchanged; True if it was written (then the effects run)."""
        sql, params = self.statement()
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            applied = cursor.fetchone() is not None
        if applied:
            for func, args, kwargs in self._effects:
                after_commit(func, *args, **kwargs)
        return applied

    def statement(self):
        """The SQL and parameters: the guarded job update, then writes that depend on it."""
        job = self.job
        fields = [_job_field(name) for name in (*self._fields, "last_event_seq", "updated_at")]
        params = [_db_value(field, job, add=False) for field in fields]
        params.extend(self._expected)
        ctes = [_guarded_update(tuple(field.column for field in fields))]
        if self._attempt is not None:
            ctes.append(_insert("attempt_row", StepAttempt, [self._attempt], params))
        if self._finished is not None:
            token, values = self._finished
            columns = tuple(values)
            ctes.append(_attempt_update(columns))
            params.extend(_attempt_field(name).get_db_prep_save(values[name], connection) for name in columns)
            params.append(token)
        if self._events:
            ctes.append(_insert("event_rows", JobEvent, self._events, params))
        return "WITH " + ", ".join(ctes) + " SELECT 1 FROM job", params


# The SQL of each shape is built once per process: building it from the
# models' metadata cost more CPU than the rest of a write.


@functools.cache
def _job_field(name):
    return Job._meta.get_field(name)


@functools.cache
def _attempt_field(name):
    return StepAttempt._meta.get_field(name)


@functools.cache
def _guarded_update(columns):
    assignments = ", ".join(f"{_quote(column)} = %s" for column in columns)
    return (
        f"job AS (UPDATE {_quote(Job._meta.db_table)} SET {assignments} "
        "WHERE id = %s AND step_token = %s AND step_state = %s AND status = %s AND last_event_seq = %s "
        "RETURNING id)"
    )


@functools.cache
def _attempt_update(names):
    table = _quote(StepAttempt._meta.db_table)
    assignments = ", ".join(f"{_quote(_attempt_field(name).column)} = %s" for name in names)
    return f"attempt_end AS (UPDATE {table} SET {assignments} FROM job WHERE {table}.job_id = job.id AND {table}.token = %s)"


@functools.cache
def _insert_fields(model):
    return tuple(field for field in model._meta.concrete_fields if not isinstance(field, models.AutoField))


@functools.cache
def _insert_sql(name, model, count):
    """A CTE inserting ``count`` rows of ``model`` only if the job row was updated."""
    fields = _insert_fields(model)
    # Each value is cast to its column's type without the length: a value
    # too long for a varchar(n) then fails on insert instead of being cut.
    placeholders = ", ".join(f"%s::{re.sub(r'[(].*[)]', '', field.db_type(connection))}" for field in fields)
    values = ", ".join(f"({placeholders})" for _ in range(count))
    columns = ", ".join(_quote(field.column) for field in fields)
    return (
        f"{name} AS (INSERT INTO {_quote(model._meta.db_table)} ({columns}) "
        f"SELECT * FROM (VALUES {values}) AS v WHERE EXISTS (SELECT 1 FROM job))"
    )


def _insert(name, model, rows, params):
    for row in rows:
        params.extend(_db_value(field, row, add=True) for field in _insert_fields(model))
    return _insert_sql(name, model, len(rows))


def _db_value(field, instance, *, add):
    return field.get_db_prep_save(field.pre_save(instance, add), connection)


def _quote(name):
    return connection.ops.quote_name(name)
