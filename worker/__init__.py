"""Everything that executes: the worker process, the chunk task, task kinds' execution, engines, model
preparation, the reconciler."""
