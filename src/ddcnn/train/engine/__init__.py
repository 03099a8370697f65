"""The training engine: one loop for every stage over a stage state declared once, shuffled in-memory batches, the
local stage's timing. It knows no parallelism (a stage's way hands it a sync rule and a saver) and no stage."""
