"""A job built from the row of a written-out statement, as ``Job.objects.raw`` builds it, for less CPU.

A RawQuerySet works out on every query which column is which field,
compiles their converters and wraps the cursor: in a profile of the workers
that was about as much CPU as the rest of the claim. Here the layout of a
result (its column names) is worked out once, and a row is converted and
handed to ``Job.from_db`` as the ORM does. Columns that are not the job's
fields become attributes of the instance, as with ``raw``.
"""

import functools
from dataclasses import dataclass

from django.db import connection

from jobs.models import Job


def fetch_job(sql, params):
    """The first row of ``sql`` as a ``Job``, or None when it returned no row."""
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
        if row is None:
            return None
        columns = tuple(column.name for column in cursor.description)
    layout = _layout(columns)
    values = [_converted(row[position], converters) for position, converters in layout.fields]
    job = Job.from_db(connection.alias, layout.names, values)
    for name, position in layout.extras:
        setattr(job, name, row[position])
    return job


@dataclass(frozen=True)
class _Layout:
    names: tuple  # the attnames of the job's fields in the result, in the model's order
    fields: tuple  # (position in the row, converters) for each of them
    extras: tuple  # (name, position) of the other columns


@functools.cache
def _layout(columns):
    position_of = {name: position for position, name in enumerate(columns)}
    if Job._meta.pk.column not in position_of:
        raise ValueError("A job's row must include its primary key.")
    names, fields = [], []
    for field in Job._meta.concrete_fields:
        if field.column in position_of:
            names.append(field.attname)
            fields.append((position_of[field.column], _converters(field)))
    known = {field.column for field in Job._meta.concrete_fields}
    extras = tuple((name, position) for position, name in enumerate(columns) if name not in known)
    return _Layout(tuple(names), tuple(fields), extras)


def _converters(field):
    """The backend's and the field's converters of ``field``'s values, as the ORM's compiler applies them."""
    column = field.get_col(Job._meta.db_table)
    converters = [*connection.ops.get_db_converters(column), *column.get_db_converters(connection)]
    return tuple((converter, column) for converter in converters)


def _converted(value, converters):
    for converter, column in converters:
        value = converter(value, column, connection)
    return value
