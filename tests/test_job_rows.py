"""jobs.job_rows.fetch_job: a job from a written-out statement, exactly as the ORM would load it."""

import datetime
import uuid

import pytest
from django.db import connection
from django.utils import timezone

from jobs.job_rows import fetch_job
from jobs.models import Job, JobStatus, StepState

pytestmark = pytest.mark.django_db

TABLE = Job._meta.db_table


def stored_job():
    return Job.objects.create(
        feature_name="business_plan",
        steps=["prompt_enhancer", "fast_chat_llm"],
        status=JobStatus.RUNNING,
        step_state=StepState.RUNNING,
        current_step_index=1,
        step_token=7,
        step_attempt=2,
        context={"initial_input": {"topic": "ünïcode", "n": 3}, "prompt_enhancer": {"text": "x", "list": [1, None]}},
        step_started_at=timezone.now() - datetime.timedelta(seconds=3),
        last_event_seq=5,
    )


def field_values(job):
    return {field.attname: getattr(job, field.attname) for field in Job._meta.concrete_fields}


def test_every_field_is_what_the_orm_loads_for_the_same_row():
    job = stored_job()

    fetched = fetch_job(f"SELECT * FROM {TABLE} WHERE id = %s", [str(job.id)])

    assert field_values(fetched) == field_values(Job.objects.get(pk=job.pk))
    assert isinstance(fetched.id, uuid.UUID)
    assert fetched.context["initial_input"]["topic"] == "ünïcode"
    assert fetched.step_started_at.tzinfo is not None
    # Loaded from the database, as the ORM marks it: a save updates the row.
    assert fetched._state.adding is False and fetched._state.db == "default"


def test_columns_in_another_order_land_on_their_fields():
    job = stored_job()
    columns = [field.column for field in reversed(Job._meta.concrete_fields)]

    fetched = fetch_job(f"SELECT {', '.join(columns)} FROM {TABLE} WHERE id = %s", [str(job.id)])

    assert field_values(fetched) == field_values(Job.objects.get(pk=job.pk))


def test_other_columns_become_attributes_and_fields_left_out_load_when_read():
    job = stored_job()

    fetched = fetch_job(f"SELECT id, status, 41 + 1 AS answer FROM {TABLE} WHERE id = %s", [str(job.id)])

    assert fetched.answer == 42
    assert fetched.status == JobStatus.RUNNING
    assert fetched.get_deferred_fields() >= {"context", "step_token"}
    with connection.cursor():
        assert fetched.step_token == 7  # deferred: read from the row when asked


def test_no_row_is_none():
    assert fetch_job(f"SELECT * FROM {TABLE} WHERE id = %s", [str(uuid.uuid4())]) is None


def test_a_result_without_the_primary_key_is_refused():
    stored_job()

    with pytest.raises(ValueError, match="primary key"):
        fetch_job(f"SELECT status FROM {TABLE} LIMIT 1", [])
