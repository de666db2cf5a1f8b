"""How a job's state change reaches the database: under the row lock, or as one conditional statement.

The state machine in ``jobs.steps`` (and ``jobs.services``) changes a ``Job`` in memory and hands
what it writes (job fields, an attempt row, event rows) to a writer:

Events a job's webhook wants add their ``webhooks.Delivery`` rows (the
outbox) to the same write.

- ``LOCKED`` writes at once through the ORM, inside the caller's transaction,
  with the job row locked (``lock_job``). Every operation can use it.
- ``ConditionalWrite(job)`` collects the writes of one transition and sends
  them as one statement, which applies only if the job row still has the
  token, step state, status and last event seq it had when it was read. The
  engine's hot path reads the job without a lock and writes each transition
  in one round trip; when the row moved meanwhile (a cancel, a duplicate
  message, maintenance), nothing is written and the caller falls back to
  the locked path.

- ``UnreadClaim`` is the engine's claim of a step message that names its
  service, written without reading the job: one statement that starts the
  attempt only if that step is the job's current, claimable one.

Every change to a job bumps at least one of those four columns, so a
conditional write can never overwrite a change it did not see, and event
seqs computed from the row that was read stay gapless and unique.

Either way, what must happen only once the write is durable (pushing
events, sending messages, logging the outcome) goes to ``after_commit``.
"""

import functools
import json
import re

from django.db import connection, models

from common.after_commit import after_commit
from jobs.job_rows import fetch_job
from jobs.models import EventType, Job, JobEvent, JobStatus, StepAttempt, StepState
from webhooks.models import Delivery


class LockedWriter:
    """Writes through the ORM at once; the caller holds the row lock in a transaction."""

    def create_attempt(self, attempt):
        attempt.save(force_insert=True)

    def finish_attempt(self, job, token, **values):
        StepAttempt.objects.filter(job=job, token=token).update(**values)

    def add_events(self, job, rows):
        JobEvent.objects.bulk_create(rows)

    def add_deliveries(self, job, rows):
        Delivery.objects.bulk_create(rows)

    def save(self, job, fields):
        job.save(update_fields=[*fields, "last_event_seq", "updated_at"])

    def after_commit(self, func, /, *args, **kwargs):
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
        self._deliveries = []
        self._effects = []

    def create_attempt(self, attempt):
        self._attempt = attempt

    def finish_attempt(self, job, token, **values):
        self._finished = (token, values)

    def add_events(self, job, rows):
        self._events.extend(rows)

    def add_deliveries(self, job, rows):
        self._deliveries.extend(rows)

    def save(self, job, fields):
        self._fields.extend(name for name in fields if name not in self._fields)

    def after_commit(self, func, /, *args, **kwargs):
        self._effects.append((func, args, kwargs))

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
        if self._deliveries:
            # The webhook outbox (jobs with a webhook_url only): in the same
            # statement as its events, so neither is written without the other.
            ctes.append(_insert("delivery_rows", Delivery, self._deliveries, params))
        return "WITH " + ", ".join(ctes) + " SELECT 1 FROM job", params


# In the event an unread claim writes, where the statement puts the attempt number.
ATTEMPT_PLACEHOLDER = "{attempt}"


class UnreadClaim:
    """The claim of a step whose job was not read first, as one statement.

    It applies only if the job's current step is ``step`` (a ``StepDispatch``:
    job, index, token, service), queued or waiting, and the job pending or
    running, before its deadline if it has one. Then it starts the attempt as ``jobs.steps.step_claim`` does: the
    job RUNNING with its attempt count and event seq advanced (computed from
    the row), the attempt row, and the STEP_STARTED event, whose payload is
    ``started_event`` with the row's figures filled in. Run outside a
    transaction, it commits by itself.
    """

    def __init__(self, step, *, now, started_event):
        self.step = step
        self.started_at = now
        self.started_event = started_event

    def execute(self):
        """The job as the claim left it, or None when the step was not claimable.

        The job carries ``claimed_from`` (the step state it was claimed
        from), ``waiting_since`` (its updated_at before the claim) and
        ``started_event`` (the payload written).
        """
        job = fetch_job(_unread_claim_sql(), self.params())
        if job is not None and isinstance(job.started_event, str):
            job.started_event = json.loads(job.started_event)
        return job

    def params(self):
        step, now = self.step, self.started_at
        attempt = StepAttempt(step_index=step.step_index, service=step.service, attempt=0, token=0, started_at=now)
        payload = JobEvent._meta.get_field("payload").get_db_prep_save(self.started_event, connection)
        return [
            str(step.job_id),
            # SET
            JobStatus.RUNNING, StepState.RUNNING, now, now, now,
            # WHERE
            step.step_index, step.token, StepState.QUEUED, StepState.WAITING, JobStatus.PENDING, JobStatus.RUNNING,
            step.step_index, step.service, now,
            # the attempt row's values that do not come from the job row
            *(_db_value(field, attempt, add=True) for field in _insert_fields(StepAttempt) if field.name not in _FROM_JOB),
            # the event row
            EventType.STEP_STARTED, payload, self.started_event["message"], ATTEMPT_PLACEHOLDER, now,
        ]


# Columns of the attempt row an unread claim takes from the job row it updated.
_FROM_JOB = {"job": "id", "step_index": "current_step_index", "attempt": "step_attempt", "token": "step_token"}


@functools.cache
def _unread_claim_sql():
    table = _quote(Job._meta.db_table)
    column = {name: _quote(_job_field(name).column) for name in (
        "status", "step_state", "step_attempt", "step_started_at", "last_progress_at", "last_event_seq",
        "updated_at", "current_step_index", "step_token", "steps", "deadline_at",
    )}
    attempt_fields = _insert_fields(StepAttempt)
    attempt_values = ", ".join(
        f"job.{_quote(_FROM_JOB[field.name])}" if field.name in _FROM_JOB else f"%s::{_cast(field)}"
        for field in attempt_fields
    )
    event = {name: _quote(JobEvent._meta.get_field(name).column) for name in ("job", "seq", "type", "payload", "created_at")}
    return (
        f"WITH before AS (SELECT id, {column['step_state']}, updated_at FROM {table} WHERE id = %s), "
        f"job AS (UPDATE {table} AS j SET {column['status']} = %s, {column['step_state']} = %s, "
        f"{column['step_attempt']} = j.{column['step_attempt']} + 1, {column['step_started_at']} = %s, "
        f"{column['last_progress_at']} = %s, {column['last_event_seq']} = j.{column['last_event_seq']} + 1, "
        f"{column['updated_at']} = %s "
        f"FROM before WHERE j.id = before.id AND j.{column['current_step_index']} = %s "
        f"AND j.{column['step_token']} = %s AND j.{column['step_state']} IN (%s, %s) "
        f"AND j.{column['status']} IN (%s, %s) AND j.{column['steps']} ->> %s = %s "
        f"AND (j.{column['deadline_at']} IS NULL OR j.{column['deadline_at']} > %s) "
        f"RETURNING j.*, before.{column['step_state']} AS claimed_from, before.updated_at AS waiting_since), "
        f"attempt_row AS (INSERT INTO {_quote(StepAttempt._meta.db_table)} "
        f"({', '.join(_quote(field.column) for field in attempt_fields)}) SELECT {attempt_values} FROM job), "
        f"event_row AS (INSERT INTO {_quote(JobEvent._meta.db_table)} "
        f"({', '.join(event.values())}) SELECT job.id, job.{column['last_event_seq']}, %s, "
        f"%s::jsonb || jsonb_build_object('seq', job.{column['last_event_seq']}, "
        f"'attempt', job.{column['step_attempt']}, 'total_steps', jsonb_array_length(job.{column['steps']}), "
        f"'message', replace(%s, %s, job.{column['step_attempt']}::text)), %s FROM job "
        "RETURNING payload) "
        "SELECT job.*, event_row.payload AS started_event FROM job, event_row"
    )


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
    placeholders = ", ".join(f"%s::{_cast(field)}" for field in fields)
    values = ", ".join(f"({placeholders})" for _ in range(count))
    columns = ", ".join(_quote(field.column) for field in fields)
    return (
        f"{name} AS (INSERT INTO {_quote(model._meta.db_table)} ({columns}) "
        f"SELECT * FROM (VALUES {values}) AS v WHERE EXISTS (SELECT 1 FROM job))"
    )


def _cast(field):
    return re.sub(r"[(].*[)]", "", field.db_type(connection))


def _insert(name, model, rows, params):
    for row in rows:
        params.extend(_db_value(field, row, add=True) for field in _insert_fields(model))
    return _insert_sql(name, model, len(rows))


def _db_value(field, instance, *, add):
    return field.get_db_prep_save(field.pre_save(instance, add), connection)


def _quote(name):
    return connection.ops.quote_name(name)
