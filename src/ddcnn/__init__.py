"""ddcnn: model-parallel CNN training by domain decomposition.

Images are cut into a grid of subimages (:class:`Decomposition`); one small CNN per subimage is trained
independently (:class:`LocalEnsemble`, all of them as one batched network); their probabilities are combined
(``ddcnn.combiners``) into one decision, by a dense network (:class:`CNNDNN`) or by cheaper rules; everything is
compared with a :class:`GlobalCNN` trained on whole images. :func:`fit` runs the whole protocol on your own
``torch.utils.data.Dataset``s (:mod:`ddcnn.api`); :func:`load_run` loads a finished run back.
"""

import importlib

from ddcnn.decomposition import Decomposition
from ddcnn.errors import DDCNNError
from ddcnn.models import (
    CNNDNN,
    DNN,
    GlobalCNN,
    LocalEnsemble,
    MajorityVote,
    MeanProbability,
    WeightedMean,
    build_combiner,
    combiners,
    count_parameters,
    forward_flops,
    local_loss,
    local_width,
    transfer_cnn_dnn,
)

__version__ = "0.1.0"


def __getattr__(name: str):
    # load_run and Run live in the finished-run library (ddcnn.finished.run), which builds every model: loaded on
    # first use, so that `import ddcnn` (every worker and CLI process) stays light.
    if name in ("Run", "load_run"):
        from ddcnn.finished import run

        return getattr(run, name)
    if name in ("fit", "evaluate", "predict"):
        # The protocol on your own Datasets (ddcnn.api), loaded likewise. By name: the trainer's modules read
        # ddcnn.__version__ from this package, and must not count as importing the layer above them.
        return getattr(importlib.import_module("ddcnn.api"), name)
    raise AttributeError(f"module 'ddcnn' has no attribute {name!r}")

__all__ = [
    "CNNDNN", "DNN", "DDCNNError", "Decomposition", "GlobalCNN", "LocalEnsemble", "MajorityVote", "MeanProbability",
    "Run", "WeightedMean", "build_combiner", "combiners", "count_parameters", "evaluate", "fit", "forward_flops",
    "load_run", "local_loss", "local_width", "predict", "transfer_cnn_dnn", "__version__",
]
