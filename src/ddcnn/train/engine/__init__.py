"""The training engine: one loop for every stage, shuffled in-memory batches, the local stage's timing."""
