"""The database backend of green workers: django-db-geventpool's, with its bound made exact (base.py)."""
