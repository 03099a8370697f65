"""``ddcnn show``: what a config builds (decomposition, sizes, parameters, FLOPs) before anything trains."""

from __future__ import annotations

from pathlib import Path

from ddcnn.build import Models, Shapes
from ddcnn.config import Config, active, builtin_backbone_only
from ddcnn.data.datasets import load_datasets
from ddcnn.data.loading import to_float
from ddcnn.errors import ConfigError
from ddcnn.models import count_parameters, forward_flops
from ddcnn.models.settings import check_model_settings
from ddcnn.models.width import WholeImages
from ddcnn.sizing import check_parameters
from ddcnn.train.traffic import scaling_lines


def describe(cfg: Config, png: Path | None = None, trusted: bool = True, source: str = "the config") -> str:
    """Decomposition, subimage size, parameters and FLOPs of the global CNN, one local CNN, all local CNNs and
    the CNN-DNN; draws the grid over a sample image into ``png`` when it is given. ``trusted``, ``source``: as for
    a run (:func:`ddcnn.models.settings.check_model_settings`)."""
    check_model_settings(cfg.model, cfg.combiner, trusted, source, builtin_only=builtin_backbone_only(cfg))
    train, _ = load_datasets(cfg.data)
    shapes = Shapes(train.in_channels, train.num_classes, train.image_size)
    models = Models(cfg, shapes)
    # The three models below are built at once, for real: sized on the meta device first (a width of 2**40 is
    # refused here, not by the allocator).
    check_parameters(cfg, models, ("global", "local", "coherent"))
    d = models.decomposition
    shape = (shapes.in_channels, *shapes.image_size)
    global_cnn, ensemble, cnn_dnn = models.global_cnn(), models.ensemble(), models.cnn_dnn()
    local = ensemble.local_model(0)
    one, many = ("one sub-network", f"{d.n_subdomains} sub-networks") if models.width_kind else \
        ("one local CNN", f"{d.n_subdomains} local CNNs")
    rows: list[tuple[str, int | str, int, int]] = [
        ("global CNN", cfg.model.width, count_parameters(global_cnn), forward_flops(global_cnn, shape)),
        (one, models.local_width, count_parameters(local),
         forward_flops(local, (shapes.in_channels, *d.subimage_size))),
        (many, models.local_width, count_parameters(ensemble),
         forward_flops(ensemble, (d.n_subdomains, shapes.in_channels, *d.subimage_size))),
    ]
    if active(cfg, "coherent") or active(cfg, "transfer") or not models.width_kind:
        rows.append(("CNN-DNN", models.local_width, count_parameters(cnn_dnn), forward_flops(cnn_dnn, shape)))
    lines = [
        f"dataset        {cfg.data.name}: {len(train)} training images {list(shapes.image_size)} x "
        f"{shapes.in_channels} channel(s), {shapes.num_classes} classes",
        f"decomposition  grid {list(d.grid)}, overlap {list(d.overlap)} -> {d.n_subdomains} subimages of "
        f"{list(d.subimage_size)}" if not isinstance(d, WholeImages) else
        f"decomposition  width: {d.n_subdomains} sub-networks of width {models.local_width}, each on the whole "
        f"{list(d.image_size)} image",
        *([f"recomposed     global_transfer: the {d.n_subdomains} sub-networks' weights as the diagonal blocks of "
           f"the global CNN of width {cfg.model.width} (cross-group blocks at {cfg.decomposition.cross_scale:g} x "
           f"its initialisation), trained further"] if models.width_kind else []),
        f"backbone       {cfg.model.backbone}, depth {list(ensemble.depth or []) or 'its own'}, "
        + (f"global width {cfg.model.width}, local width {models.local_width}, " if ensemble.family.takes_width()
           else "")
        + f"backend {ensemble.backend}",
        *(f"note           {note}" for note in models.notes),
        "",
        f"{'model':<16} {'width':>6} {'parameters':>12} {'MFLOPs/image':>13}",
    ]
    if not ensemble.family.takes_width():  # e.g. torchvision's resnet18: its own widths, so none to print
        rows = [(n, "—", p, f) for n, _, p, f in rows]
        lines.insert(-2, f"note           {cfg.model.backbone} takes no width: its own layer widths are used")
    lines += [f"{n:<16} {w:>6} {p:>12,} {f / 1e6:>13.2f}" for n, w, p, f in rows]
    lines.append("")
    lines += scaling_lines(cfg, models)
    lines.append("")
    lines.append("subdomain locations (start..., stop...):")
    lines += [f"  {i:3d}: {loc}" for i, loc in enumerate(d.locations.tolist())]
    if png is not None:
        from ddcnn.report import plot_decomposition

        try:
            plot_decomposition(to_float(train.images[0]), d, Path(png))
        except OSError as err:
            raise ConfigError(f"cannot write {png}: {err.strerror}; pass --png with a writable path") from None
        lines.append(f"grid drawn over a sample image: {png}")
    return "\n".join(lines)
