"""Everything that executes: Celery app, tasks, engines, result store, model preparation."""
