"""ddcnn: model-parallel CNN training by domain decomposition.

Images are cut into a grid of subimages (:class:`Decomposition`); one small CNN per subimage is trained
independently (:class:`LocalEnsemble`, all of them as one batched network); their probabilities are combined
(``ddcnn.combiners``) into one decision, by a dense network (:class:`CNNDNN`) or by cheaper rules; everything is
compared with a :class:`GlobalCNN` trained on whole images. :func:`fit` runs the whole protocol on your own
``torch.utils.data.Dataset``s (:mod:`ddcnn.api`); :func:`load_run` loads a finished run back.
"""

__version__ = "0.1.0"

# Every public name is imported on first use (PEP 562), so that `ddcnn --version` and `ddcnn --help` answer
# without importing torch, and `import ddcnn` in a worker stays light. load_run and Run live in the finished-run
# library (ddcnn.finished.run), which builds every model.
_HOMES = {"Decomposition": "ddcnn.decomposition", "DDCNNError": "ddcnn.errors", "Run": "ddcnn.finished.run",
          "load_run": "ddcnn.finished.run",
          # the protocol on your own Datasets (ddcnn.api); by name: the trainer's modules read ddcnn.__version__
          # from this package, and must not count as importing the layer above them
          **dict.fromkeys(("fit", "evaluate", "predict"), "ddcnn.api"),
          **dict.fromkeys(("CNNDNN", "DNN", "GlobalCNN", "LocalEnsemble", "MajorityVote", "MeanProbability",
                           "WeightedMean", "build_combiner", "combiners", "count_parameters", "forward_flops",
                           "local_loss", "local_width", "transfer_cnn_dnn"), "ddcnn.models")}


def __getattr__(name: str):
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'ddcnn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "CNNDNN", "DNN", "DDCNNError", "Decomposition", "GlobalCNN", "LocalEnsemble", "MajorityVote", "MeanProbability",
    "Run", "WeightedMean", "build_combiner", "combiners", "count_parameters", "evaluate", "fit", "forward_flops",
    "load_run", "local_loss", "local_width", "predict", "transfer_cnn_dnn", "__version__",
]
