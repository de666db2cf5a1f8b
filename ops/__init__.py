"""The ops console: the Django admin for services, recipes and jobs."""
