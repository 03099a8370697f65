"""Volumes as medical imagers expect them: one canonical frame, a target voxel spacing, a checked intensity.

Every NIfTI file and DICOM series goes through the same steps, in this order (:func:`prepare_volume`):

1. **read**: NIfTI with nibabel, whose array proxy applies the header's ``scl_slope`` and ``scl_inter``; DICOM with
   pydicom (:mod:`ddcnn.data.dicom`), ``RescaleSlope`` and ``RescaleIntercept`` applied. Trailing axes of length 1
   (``(X, Y, Z, 1)``) are dropped.
2. **canonical frame**: the voxel axes are flipped and permuted, never interpolated, to ``orientation`` (nibabel's
   ``io_orientation`` / ``ornt_transform`` / ``apply_orientation``; ``RAS``: the first axis runs to the patient's
   Right, the second to Anterior, the third to Superior), then read as ``(D, H, W) = (Z, Y, X)``: depth runs
   inferior to superior, height posterior to anterior, width left to right. Two files of one scan stored in
   different orientations give the same array. An oblique scan is turned to its closest canonical axes (as
   nibabel's ``as_closest_canonical``), not resampled onto them.
3. **intensity**: :mod:`ddcnn.data.intensity` (window, percentile, zscore or stored; the HU window checks the range).
4. **spacing**: with ``spacing`` = ``(D, H, W)`` mm the volume is resampled to ``round(shape * own / target)`` voxels
   (trilinear, ``align_corners=False``: half-voxel centres, no antialiasing), then cropped or padded about its
   centre to ``size`` (crop start ``(n - size) // 2``; pad ``(size - n) // 2`` before, the rest after, with the
   volume's minimum). Without ``spacing`` the volume is stretched to ``size`` (trilinear), as stored.

``.npy`` arrays carry no frame: they are taken as ``(D, H, W)`` in the canonical frame already, with no spacing.
The whole recipe is :class:`VolumeRecipe`; its :meth:`~VolumeRecipe.to_json` goes into the run's ``data.json`` and
the export sidecar, so that ``ddcnn predict`` and a client outside ddcnn prepare a new file the same way.

nibabel's orientation tools were chosen over torchio's ``ToCanonical``/``Resample`` and MONAI's ``Orientation``/
``Spacing``: nibabel is already the reader of NIfTI (the ``ddcnn[nifti]`` extra), its reorientation is exact
(flips and permutations), and the resampling that follows is one ``torch.nn.functional.interpolate`` call that a
client can repeat with numpy; torchio and MONAI would add SimpleITK or a large dependency tree for the same result.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ddcnn.data.intensity import apply_intensity, check_window_range
from ddcnn.errors import DataError

NIFTI_EXTRA = "pip install nibabel (or the extra `ddcnn[nifti]`)"
# Each intensity mode in words, for the sidecar's reader (data/intensity.py computes them).
INTENSITY_RULES = {
    "window": "clip to [low, high], then (v - low) / (high - low)",
    "percentile": "low, high = numpy.percentile(volume, percentiles) (linear); clip to [low, high], then "
                  "(v - low) / (high - low); all zeros when high <= low",
    "zscore": "(v - mean) / std over the whole volume (population std; 1 when it is 0)",
    "stored": "values as read (after the header's scaling)",
}


@dataclass(frozen=True)
class VolumeRecipe:
    """How a volume file becomes a model input ``(D, H, W)`` float32; see the module's docstring."""

    size: tuple[int, int, int]
    orientation: str = "RAS"
    spacing: tuple[float, float, float] | None = None
    intensity: str = "window"
    window: tuple[float, float] | None = (-1000.0, 400.0)
    percentiles: tuple[float, float] = (0.5, 99.5)

    @classmethod
    def from_config(cls, data) -> VolumeRecipe:
        """The recipe of a :class:`~ddcnn.config.DataConfig` (its ``image_size`` is the size)."""
        return cls(tuple(data.image_size), data.orientation.upper(),
                   tuple(data.spacing) if data.spacing is not None else None, data.intensity,
                   tuple(data.window) if data.window is not None else None, tuple(data.percentiles))

    def to_json(self) -> dict:
        """The recipe with every step spelled out, for ``data.json`` and the export sidecar."""
        return {
            "orientation": self.orientation,
            "axis_order": "(D, H, W) = the canonical frame's (Z, Y, X) voxel axes; .npy arrays are taken as (D, H, "
                          "W) as stored",
            "scaling": "NIfTI scl_slope/scl_inter and DICOM RescaleSlope/RescaleIntercept applied on reading",
            "intensity": self.intensity, "intensity_rule": INTENSITY_RULES[self.intensity],
            "window": list(self.window) if self.window is not None else None,
            "percentiles": list(self.percentiles),
            "spacing": list(self.spacing) if self.spacing is not None else None,
            "interpolation": "trilinear, align_corners=False (half-voxel centres), no antialiasing",
            "resample_shape": "round(shape * own spacing / spacing), at least 1",
            "fit": "crop_or_pad" if self.spacing is not None else "resize",
            "crop_or_pad": "about the centre: crop start (n - size) // 2, pad (size - n) // 2 before and the rest "
                           "after, with the volume's minimum",
            "size": list(self.size),
            "order": ["read", "canonical orientation", "intensity", "resample to spacing", "fit to size"],
        }

    @classmethod
    def from_json(cls, meta: dict) -> VolumeRecipe:
        spacing, window = meta.get("spacing"), meta.get("window")
        return cls(tuple(meta["size"]), meta["orientation"], tuple(spacing) if spacing is not None else None,
                   meta["intensity"], tuple(window) if window is not None else None, tuple(meta["percentiles"]))


def volume_recipe(data) -> VolumeRecipe | None:
    """How the volumes of a volume-folder :class:`~ddcnn.config.DataConfig` are prepared (None for other data)."""
    return VolumeRecipe.from_config(data) if data.name == "volume-folder" else None


@dataclass
class RawVolume:
    """A volume read from its file: ``array`` ``(D, H, W)`` float32 in the canonical frame, its voxel ``spacing``
    ``(D, H, W)`` in mm and the axis codes it was ``stored`` in (both None for ``.npy``)."""

    array: np.ndarray
    spacing: tuple[float, float, float] | None
    stored: str | None = None


@dataclass
class Prepared:
    """A model input ``volume`` ``(D, H, W)`` float32 and what its file said: voxel ``spacing`` ``(D, H, W)`` mm and
    ``stored`` orientation (None for ``.npy``)."""

    volume: torch.Tensor
    spacing: tuple[float, float, float] | None
    stored: str | None


def _nibabel(source: str):
    try:
        import nibabel
    except ImportError as e:
        raise DataError(f"{source} is a NIfTI file or DICOM series and reading it needs nibabel (its orientation "
                        f"tools), which is not installed; {NIFTI_EXTRA}") from e
    return nibabel


def canonical(array: np.ndarray, affine: np.ndarray, orientation: str, source: str) -> RawVolume:
    """Voxels ``(I, J, K)`` with a voxel-to-world ``affine`` (RAS+ world, as NIfTI) turned to ``orientation`` and
    read as ``(D, H, W)``: exact flips and axis swaps (nibabel's orientation tools), no interpolation."""
    nibabel = _nibabel(source)
    from nibabel import orientations

    try:
        stored = orientations.io_orientation(affine)
    except Exception as e:  # noqa: BLE001 - a singular or non-finite affine
        raise DataError(f"{source} has a voxel-to-world affine nibabel cannot read an orientation from ({e}); fix "
                        f"the header's sform/qform") from e
    transform = orientations.ornt_transform(stored, orientations.axcodes2ornt(tuple(orientation)))
    turned = orientations.apply_orientation(array, transform)
    affine = affine @ orientations.inv_ornt_aff(transform, array.shape)
    spacing = tuple(float(v) for v in nibabel.affines.voxel_sizes(affine))
    return RawVolume(np.ascontiguousarray(turned.transpose(2, 1, 0), dtype=np.float32),
                     (spacing[2], spacing[1], spacing[0]), "".join(orientations.ornt2axcodes(stored)))


def _squeezed(vol: np.ndarray, path: Path) -> np.ndarray:
    """Trailing axes of length 1 dropped ((X, Y, Z, 1) as some converters write), then checked to be 3-D."""
    while vol.ndim > 3 and vol.shape[-1] == 1:
        vol = vol[..., 0]
    if vol.ndim != 3:
        raise DataError(f"{path} holds a {vol.ndim}-D array of shape {vol.shape}; a volume must be 3-D (a 4-D "
                        f"series: save one time point per file).")
    if 0 in vol.shape:
        raise DataError(f"{path} holds an empty volume of shape {vol.shape} (an axis of length 0); replace or "
                        f"remove the file.")
    if not (np.issubdtype(vol.dtype, np.number) or vol.dtype == np.bool_) or np.iscomplexobj(vol):
        raise DataError(f"{path} holds {vol.dtype} values; a volume must hold real numbers.")
    return vol


def read_raw(path: Path, orientation: str = "RAS") -> RawVolume:
    """One ``.npy`` file, NIfTI file or DICOM series folder as a :class:`RawVolume` (scaled, canonical)."""
    if path.is_dir():
        from ddcnn.data.dicom import read_series

        array, affine = read_series(path)
        return canonical(array, affine, orientation, str(path))
    if path.name.lower().endswith(".npy"):
        try:
            vol = np.load(path, allow_pickle=False)
        except Exception as e:  # ValueError for pickled/object arrays, OSError/EOFError for bad files
            raise DataError(f"{path} cannot be read as a .npy array ({e}); save it with numpy.save "
                            "as a plain numeric array.") from e
        if not isinstance(vol, np.ndarray):   # a .npz archive renamed .npy loads as a dict-like NpzFile
            vol.close()
            raise DataError(f"{path} is an .npz archive, not a .npy array; save each volume with numpy.save.")
        return RawVolume(np.ascontiguousarray(_squeezed(vol, path), dtype=np.float32), None)
    if path.name.lower().endswith(".dcm"):
        raise DataError(f"{path} is one DICOM file; a volume is a series: give the folder that holds all its "
                        f"slices (one folder per series)")
    nibabel = _nibabel(str(path))
    try:
        image = nibabel.load(str(path))
        vol = np.asarray(image.dataobj)  # the proxy applies scl_slope, scl_inter
        affine = image.affine
    except Exception as e:  # nibabel raises ImageFileError, EOFError, zlib/gzip errors...
        raise DataError(f"{path} cannot be read as a NIfTI volume ({e}); the file is corrupt, replace it.") from e
    vol = _squeezed(vol, path)
    return canonical(np.asarray(vol, dtype=np.float32), np.asarray(affine, dtype=np.float64), orientation, str(path))


def resample_shape(shape, own, target) -> tuple[int, ...]:
    """The voxel counts after resampling from spacing ``own`` to ``target``: ``round(n * own / target)``, >= 1."""
    return tuple(max(1, int(round(n * o / t))) for n, o, t in zip(shape, own, target))


def crop_or_pad(vol: torch.Tensor, size) -> torch.Tensor:
    """``vol`` ``(D, H, W)`` cut or padded about its centre to ``size``; the padding takes the volume's minimum."""
    fill = float(vol.min())
    for axis, want in enumerate(size):
        n = vol.shape[axis]
        if n > want:
            vol = vol.narrow(axis, (n - want) // 2, want)
        elif n < want:
            before = (want - n) // 2
            shape = list(vol.shape)
            shape[axis] = want
            out = torch.full(shape, fill, dtype=vol.dtype)
            out.narrow(axis, before, n).copy_(vol)
            vol = out
    return vol.contiguous()


def _interpolate(vol: torch.Tensor, shape) -> torch.Tensor:
    if tuple(vol.shape) == tuple(shape):
        return vol
    return F.interpolate(vol[None, None], size=tuple(shape), mode="trilinear", align_corners=False)[0, 0]


def prepare_volume(path: Path, recipe: VolumeRecipe) -> Prepared:
    """The model input ``(D, H, W)`` float32 of one file or DICOM series folder under ``recipe``, with the spacing
    and orientation it was stored in."""
    raw = read_raw(path, recipe.orientation)
    if not np.isfinite(raw.array).all():
        raise DataError(f"{path} contains NaN or infinite values; fix or remove the file.")
    if recipe.intensity == "window":
        assert recipe.window is not None  # the config refuses a window mode without a window
        check_window_range(raw.array, recipe.window, str(path))
    vol = torch.from_numpy(apply_intensity(raw.array, recipe.intensity, recipe.window, recipe.percentiles))
    if recipe.spacing is None:
        return Prepared(_interpolate(vol, recipe.size), raw.spacing, raw.stored)
    if raw.spacing is None:
        raise DataError(f"{path} is a .npy array with no voxel spacing, but data.spacing = {list(recipe.spacing)} "
                        f"resamples to a spacing; give NIfTI or DICOM files, or set data.spacing: null")
    vol = _interpolate(vol, resample_shape(vol.shape, raw.spacing, recipe.spacing))
    return Prepared(crop_or_pad(vol, recipe.size), raw.spacing, raw.stored)


def describe(prepared: Prepared, recipe: VolumeRecipe) -> list[str]:
    """What preparing a volume changed, in words: its orientation turned, its spacing resampled."""
    lines = []
    if prepared.stored is not None and prepared.stored != recipe.orientation:
        lines.append(f"stored {prepared.stored}, turned to {recipe.orientation}")
    if prepared.spacing is not None and recipe.spacing is not None and \
            not np.allclose(prepared.spacing, recipe.spacing):
        lines.append(f"{'x'.join(f'{v:g}' for v in prepared.spacing)} mm voxels resampled to "
                     f"{'x'.join(f'{v:g}' for v in recipe.spacing)} mm and fitted to {'x'.join(map(str, recipe.size))}")
    return lines


def orientation_note(stored: Mapping[str, str], orientation: str) -> str | None:
    """A line counting the volumes stored in another orientation than ``orientation``, else None."""
    turned = [codes for codes in stored.values() if codes != orientation]
    if not turned:
        return None
    counts = ", ".join(f"{codes}: {turned.count(codes)}" for codes in sorted(set(turned)))
    return (f"volumes: {len(turned)} of {len(stored)} stored in another orientation ({counts}), turned to "
            f"{orientation}")


def spacing_note(spacings: Mapping[str, tuple[float, ...]]) -> str | None:
    """A warning when volumes read without a target spacing have different voxel spacings, else None."""
    distinct = sorted({tuple(round(v, 3) for v in s) for s in spacings.values()})
    if len(distinct) < 2:
        return None
    shown = ", ".join("x".join(f"{v:g}" for v in s) for s in distinct[:4]) + (" ..." if len(distinct) > 4 else "")
    return (f"the volumes have {len(distinct)} different voxel spacings (mm, D x H x W: {shown}) and each is "
            f"stretched to data.image_size as stored, so one voxel means different sizes in different volumes; set "
            f"data.spacing (e.g. [{', '.join(f'{v:g}' for v in distinct[0])}]) to resample them to one")
