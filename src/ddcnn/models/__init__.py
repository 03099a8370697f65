"""Models: backbones, the batched local ensemble, combiners, CNN-DNN and global CNN."""

from ddcnn.models.backbones import BACKBONES, build_backbone, local_width, min_input_size
from ddcnn.models.cnn_dnn import CNNDNN, GlobalCNN, check_fits, count_parameters, forward_flops, transfer_cnn_dnn
from ddcnn.models.combiners import COMBINERS, DNN, MajorityVote, MeanProbability, WeightedMean, build_combiner
from ddcnn.models.ensemble import BACKENDS, LocalEnsemble, local_loss

__all__ = [
    "BACKBONES", "BACKENDS", "CNNDNN", "COMBINERS", "DNN", "GlobalCNN", "LocalEnsemble", "MajorityVote",
    "MeanProbability", "WeightedMean", "build_backbone", "build_combiner", "check_fits", "count_parameters",
    "forward_flops", "local_loss", "local_width", "min_input_size", "transfer_cnn_dnn",
]
