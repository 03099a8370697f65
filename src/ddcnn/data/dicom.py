"""DICOM series through pydicom (the optional extra ``ddcnn[dicom]``): one folder per series.

A series folder holds the slices of one volume, one file each (any names; ``.dcm`` or none). The slices are
sorted along the normal of their plane (``ImageOrientationPatient``) by ``ImagePositionPatient``, their values
scaled by ``RescaleSlope`` and ``RescaleIntercept`` (CT: to Hounsfield units), and the voxel-to-world affine is
built from the orientation, ``PixelSpacing`` and the step between slice positions, in DICOM's LPS world turned to
NIfTI's RAS, so that :func:`ddcnn.data.volumes.canonical` puts a series in the same frame as a NIfTI file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ddcnn.errors import DataError

DICOM_EXTRA = "pip install pydicom (or the extra `ddcnn[dicom]`)"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_dicom_file(path: Path) -> bool:
    """A ``.dcm`` name, or the ``DICM`` mark after the 128-byte preamble (DICOM files often have no suffix)."""
    if path.name.lower().endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def series_files(folder: Path) -> list[Path]:
    """The DICOM files directly in ``folder`` (hidden entries left out), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and is_dicom_file(p))


def _tag(ds, name: str, path: Path, count: int | None = None) -> np.ndarray:
    value = getattr(ds, name, None)
    if value is None:
        raise DataError(f"{path} has no {name}; a slice of a series needs it to place the slice in space (export "
                        f"the series again with its geometry)")
    array = np.asarray([float(v) for v in (value if count else [value])], dtype=np.float64)
    if count and array.shape != (count,):
        raise DataError(f"{path} has {name} = {list(value)}; it must hold {count} numbers")
    return array


def read_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """A series folder as ``(array (I, J, K) float32, affine (4, 4) RAS)``: I along a row (columns), J down the
    rows, K across the sorted slices; the values rescaled."""
    try:
        import pydicom
    except ImportError as e:
        raise DataError(f"{folder} is a DICOM series and reading it needs pydicom, which is not installed; "
                        f"{DICOM_EXTRA}") from e
    files = series_files(folder)
    if not files:
        raise DataError(f"{folder} holds no DICOM files; a series folder holds the slices of one volume")
    slices = []
    for path in files:
        try:
            ds = pydicom.dcmread(str(path))
            pixels = np.asarray(ds.pixel_array, dtype=np.float64)
        except Exception as e:  # noqa: BLE001 - pydicom raises many kinds for a damaged or compressed file
            raise DataError(f"{path} cannot be read as a DICOM slice ({str(e).splitlines()[0][:160]}); replace the "
                            f"file or remove it from the series") from e
        if pixels.ndim != 2:
            raise DataError(f"{path} holds pixels of shape {pixels.shape}; ddcnn reads series of one 2-D slice "
                            f"per file (split multi-frame files first)")
        slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
        intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
        orientation = _tag(ds, "ImageOrientationPatient", path, 6)
        slices.append((path, pixels * slope + intercept, _tag(ds, "ImagePositionPatient", path, 3), orientation,
                       _tag(ds, "PixelSpacing", path, 2)))
    first = slices[0]
    for path, pixels, _, orientation, spacing in slices[1:]:
        if pixels.shape != first[1].shape or not np.allclose(orientation, first[3], atol=1e-4) or \
                not np.allclose(spacing, first[4]):
            raise DataError(f"{path} has another size, orientation or pixel spacing than {first[0]}; a series "
                            f"folder must hold the slices of one volume only: put each series in its own folder")
    row, column = first[3][:3], first[3][3:]
    normal = np.cross(row, column)
    slices.sort(key=lambda s: float(np.dot(s[2], normal)))
    positions = np.stack([s[2] for s in slices])
    if len(slices) > 1:
        gaps = np.diff(positions @ normal)
        if np.any(gaps < 1e-6):
            raise DataError(f"{folder} holds two slices at the same position ({len(slices)} files); a series "
                            f"folder must hold each slice of one volume once")
        step = (positions[-1] - positions[0]) / (len(slices) - 1)
    else:
        step = normal * float(getattr(pydicom.dcmread(str(first[0]), stop_before_pixels=True), "SliceThickness",
                                      1.0) or 1.0)
    row_spacing, column_spacing = first[4]  # PixelSpacing: between rows, then between columns
    affine = np.eye(4)
    affine[:3, 0] = row * column_spacing  # I: along a row, one column to the next
    affine[:3, 1] = column * row_spacing  # J: down a column, one row to the next
    affine[:3, 2] = step
    affine[:3, 3] = positions[0]
    # pixel_array is (rows, columns) = (J, I): each slice transposed to (I, J), stacked along K.
    array = np.stack([s[1].T for s in slices], axis=2).astype(np.float32)
    return array, _LPS_TO_RAS @ affine
