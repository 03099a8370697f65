"""How a stage uses the processes, one class per way (:class:`Parallelism`); this module holds the base and the
one-process way. The stages ask :func:`ddcnn.train.parallel.choose.choose` for a stage's way and never branch on
it: the way wraps the model, says how its batches are split, how the processes' statistics combine, how the
model is saved and how the plain model comes back.

A new way (FSDP for a large global CNN, a model x data mesh) is one subclass in its own module and one entry in
:data:`ddcnn.train.parallel.choose.WAYS`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

from torch import nn

from ddcnn.decomposition import Decomposition
from ddcnn.models import CNNDNN, LocalEnsemble
from ddcnn.models.combiners import Combiner
from ddcnn.train.dist import DistEnv
from ddcnn.train.engine.loop import ModelState, Sync
from ddcnn.train.parallel.savers import CNNDNNState

FLOAT = 4  # bytes of a float32: what ``ddcnn show`` assumes every exchanged number is


def ring(world: int) -> float:
    """Bytes each process sends in a ring all-reduce of one byte among ``world`` processes."""
    return 2 * (world - 1) / world


class Parallelism:
    """One process trains the whole model on whole batches: the base of every way, and the way of a run without
    torchrun and of the combine stage (trained on rank 0)."""

    name = "single"
    compiles = True  # the loss runs through torch.compile when the config asks for it

    def __init__(self, env: DistEnv, image_size: Sequence[int] = (), n_local: int = 0):
        """``image_size`` and ``n_local``: the run's images and local CNNs, for the ways that split them."""
        self.env, self.image_size, self.n_local = env, tuple(image_size), n_local

    @property
    def shares_model(self) -> bool:
        """Whether the processes hold parts of one model: its parameters and FLOPs are then counted, and it is
        scored, by all processes together."""
        return False

    @property
    def processes(self) -> int:
        """How many processes train the stage."""
        return 1

    def record(self) -> dict:
        """What results.json says of the stage's use of the processes."""
        return {"parallelism": self.name if self.processes > 1 else "single", "processes": self.processes}

    def shard(self, n_local: int) -> range | None:
        """The local CNNs this process holds of a CNN-DNN's ``n_local`` (None: all of them)."""
        return None

    def cnn_dnn(self, decomposition: Decomposition, ensemble: LocalEnsemble, combiner: Combiner) -> nn.Module:
        """The stage's CNN-DNN from this process's local CNNs and the DNN."""
        return CNNDNN(decomposition, ensemble, combiner)

    def wrap(self, model: nn.Module, device) -> nn.Module:
        """The module the training loss runs through (``model`` on the stage's ``device``)."""
        return model

    def trained(self, model: nn.Module, wrapped: nn.Module) -> nn.Module:
        """The module the loop trains: its parameters are optimised and its weights checked for NaN."""
        return model

    def evaluated(self, model: nn.Module, wrapped: nn.Module) -> nn.Module:
        """The module scored on validation images."""
        return model

    def parts(self) -> int:
        """The processes each training batch is split among."""
        return 1

    def batch_options(self, wrapped: nn.Module) -> dict:
        """Keywords of :meth:`ddcnn.train.context.Context.batches`: the parts each batch is split among, this
        process's subdomains (``shard``) or rows (``slab``)."""
        return {"parts": self.parts()}

    def step_bytes(self, cfg, models, stage: str) -> int | None:
        """Bytes the busiest process sends in one training step of ``stage`` (float32; a ring all-reduce of ``n``
        bytes sends :func:`ring` ``x n``), from the config (:class:`ddcnn.config.Config`) and its
        :class:`ddcnn.build.Models` alone; None where this way cannot use its processes. One process: none."""
        return 0

    def held(self, size, dnn_parameters: Callable[[], int]):
        """The part of a stage's size (a :class:`ddcnn.sizing.StageSize`: parameters, activation and input
        bytes) that one process holds; ``dnn_parameters()``: the DNN's parameters (whole on every process)."""
        return size

    def split(self, batches):
        """This process's part of every batch."""
        return batches

    def sync(self) -> Sync | None:
        """How the processes' epoch statistics combine (None: one process's are complete)."""
        return None

    def saver(self, model: nn.Module) -> ModelState | None:
        """How the stage's model is checkpointed (None: its own state dict). A CNN-DNN is saved whole, the local
        CNNs stacked, whatever the process count (:class:`CNNDNNState`)."""
        return CNNDNNState(model) if isinstance(model, CNNDNN) else None

    def clip(self, model: nn.Module) -> Callable[[float], object] | None:
        """The gradient clip (None: one norm over the model's parameters)."""
        return None

    def admit(self, cfg) -> None:
        """Refuse, before anything is written, a config (:class:`ddcnn.config.Config`) this way cannot train."""

    def plain(self, model: nn.Module) -> nn.Module:
        """The trained model as one process would hold it (for its parameter and FLOP counts)."""
        return model


def batch_part(size, world: int):
    """``size`` with its activations and inputs split among ``world`` processes (rounded up)."""
    if world <= 1:
        return size
    return dataclasses.replace(size, activation_bytes=-(-size.activation_bytes // world),
                               input_bytes=-(-size.input_bytes // world))


def local_share(size, world: int, n_local: int, dnn_parameters: Callable[[], int]):
    """``size`` of a stage whose ``n_local`` local CNNs are sharded over ``world`` processes: the largest shard's
    parameters and activations, and the DNN's ``dnn_parameters()`` whole."""
    if world <= 1:
        return size
    share = -(-n_local // world) / n_local
    dnn = dnn_parameters()
    return dataclasses.replace(size, parameters=dnn + math.ceil((size.parameters - dnn) * share),
                               activation_bytes=math.ceil(size.activation_bytes * share))
