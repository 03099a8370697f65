"""Chest phantoms written as NIfTI files (several stored orientations) and DICOM series, for the volume tests.

A phantom is an array of Hounsfield units on voxel axes (X, Y, Z) of the RAS frame (X to the patient's right, Y
to anterior, Z to superior): air outside, a soft-tissue body, two lungs, and optionally a lesion in the right lung.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SHAPE = (20, 16, 10)  # (X, Y, Z) voxels
SPACING = (1.5, 1.5, 3.0)  # mm


def phantom(lesion: bool, shape=SHAPE, seed: int = 0) -> np.ndarray:
    """Integer HU ``(X, Y, Z)``: air -1000, body 40, lungs -850, a lesion of 300 in the right lung (high X)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    hu = np.full(shape, -1000.0)
    hu[(x / 0.9) ** 2 + (y / 0.8) ** 2 < 1] = 40
    for side in (-1, 1):
        hu[((x - side * 0.42) / 0.3) ** 2 + (y / 0.5) ** 2 + (z / 0.9) ** 2 < 1] = -850
    if lesion:
        hu[((x - 0.45) / 0.18) ** 2 + ((y - 0.1) / 0.25) ** 2 + (z / 0.5) ** 2 < 1] = 300
    return np.clip(np.round(hu + rng.normal(0, 15, shape)), -1024, 3071).astype(np.int16)  # a CT scanner's range


def ras_affine(spacing=SPACING) -> np.ndarray:
    return np.diag([*spacing, 1.0])


def stored(hu: np.ndarray, affine: np.ndarray, how: str) -> tuple[np.ndarray, np.ndarray]:
    """The same voxels stored another way, with the affine that keeps every voxel at its place in the world:
    ``as_is``, ``flip_x`` (LAS: the first axis reversed) or ``zyx`` (the axes stored in reverse order)."""
    if how == "as_is":
        return hu, affine
    if how == "flip_x":
        flip = np.eye(4)
        flip[0, 0], flip[0, 3] = -1, hu.shape[0] - 1
        return hu[::-1].copy(), affine @ flip
    if how == "zyx":
        swap = np.zeros((4, 4))
        swap[0, 2] = swap[1, 1] = swap[2, 0] = swap[3, 3] = 1
        return hu.transpose(2, 1, 0).copy(), affine @ swap
    raise ValueError(how)


def save_nifti(path: Path, hu: np.ndarray, affine: np.ndarray, offset: float | None = -1024.0) -> Path:
    """``hu`` saved as uint16 ``HU - offset`` with ``scl_inter = offset`` in the header (as scanners write), or
    with no scaling at all (``offset=None``: the stored values are the data)."""
    import nibabel

    path.parent.mkdir(parents=True, exist_ok=True)
    if offset is None:
        nibabel.save(nibabel.Nifti1Image(hu, affine), str(path))
        return path
    raw = (hu.astype(np.float64) - offset).astype(np.uint16)
    image = nibabel.Nifti1Image(raw, affine)
    image.header.set_data_dtype(np.uint16)
    image.header.set_slope_inter(1.0, offset)
    nibabel.save(image, str(path))
    return path


def save_dicom_series(folder: Path, hu: np.ndarray, spacing=SPACING, plane: str = "axial") -> Path:
    """``hu`` (RAS voxels) as a CT series, one file per slice, stored as DICOM does it (LPS world): ``axial``
    slices along Z with rows running to the patient's left and down to posterior, or ``coronal`` slices along Y
    with rows running to the left and down to inferior; uint16 values plus 1024 with RescaleIntercept -1024, files
    named in no slice order."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    nx, ny, nz = hu.shape
    sx, sy, sz = spacing
    series = generate_uid()
    count = nz if plane == "axial" else ny
    for k in range(count):
        if plane == "axial":
            # Pixel (row j, column i) is LPS (x0 + i sx, y0 + j sy): RAS voxel (nx - 1 - i, ny - 1 - j, k).
            pixels, position = hu[::-1, ::-1, k].T, [-(nx - 1) * sx, -(ny - 1) * sy, k * sz]
            orientation, pixel_spacing = [1, 0, 0, 0, 1, 0], [sy, sx]
        else:
            # Pixel (row j, column i) is LPS (x0 + i sx, -k sy, z0 - j sz): RAS voxel (nx - 1 - i, k, nz - 1 - j).
            pixels, position = hu[::-1, k, ::-1].T, [-(nx - 1) * sx, -k * sy, (nz - 1) * sz]
            orientation, pixel_spacing = [1, 0, 0, 0, 0, -1], [sz, sx]
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"slice_{(k * 7) % count:03d}"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID, \
            series
        ds.Modality, ds.Rows, ds.Columns = "CT", pixels.shape[0], pixels.shape[1]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.ImageOrientationPatient, ds.ImagePositionPatient = orientation, position
        ds.PixelSpacing, ds.SliceThickness = pixel_spacing, sz if plane == "axial" else sy
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (np.ascontiguousarray(pixels).astype(np.int32) + 1024).astype(np.uint16).tobytes()
        ds.save_as(str(path), enforce_file_format=True)
    return folder
