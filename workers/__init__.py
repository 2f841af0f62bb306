"""The Celery worker that runs jobs: `celery -A workers worker`."""

from workers.app import app

__all__ = ["app"]
