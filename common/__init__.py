"""Pieces shared by every app: the error model and the API error shape."""
