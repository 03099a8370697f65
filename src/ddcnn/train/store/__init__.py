"""The run directory's store: checkpoints, the schema of its files, the run directory and the metrics log."""
