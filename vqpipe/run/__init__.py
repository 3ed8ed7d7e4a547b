"""The run: planning, the per-shard job, the Ray driver, progress and the run's outcome."""
