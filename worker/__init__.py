"""The Celery worker: the aggregator, the batch lifecycle tasks and the CLI."""
