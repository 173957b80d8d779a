"""The control plane: Celery app factory, tasks, the control worker's planning and the client side."""
