"""The ways of using the processes, one class each (:mod:`~ddcnn.train.parallel.base` one process,
:mod:`~ddcnn.train.parallel.data`, :mod:`~ddcnn.train.parallel.model`, :mod:`~ddcnn.train.parallel.spatial`,
:mod:`~ddcnn.train.parallel.local`), the one choice per stage (:mod:`~ddcnn.train.parallel.choose`), their sync
rules, savers and halo exchange."""
