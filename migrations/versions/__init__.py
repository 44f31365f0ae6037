"""Alembic revisions (a package so that a normal, non-editable install ships them)."""
