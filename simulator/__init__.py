"""A simulator of the downstream AI services, for local runs and tests."""
