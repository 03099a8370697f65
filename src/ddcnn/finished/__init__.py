"""A finished run, used without the trainer: loading its models back in one process (:func:`load_run`), reading
input files as its data was read, and the predictions ``ddcnn predict`` prints. ``ddcnn export`` and ``load_run``
load no training code; evaluation sharded over several processes (torchrun) is in :mod:`ddcnn.train.evaluate`."""
