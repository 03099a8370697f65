"""Intensity of volumes: a CT window in Hounsfield units, percentile or z-score normalisation, or values as stored.

Each mode is one small numpy function on a whole volume ``(D, H, W)`` float32, so that a client outside ddcnn can
repeat it from the export sidecar (:meth:`ddcnn.data.volumes.VolumeRecipe.to_json`) with numpy alone:

* ``window``: clipped to ``[low, high]`` and mapped linearly to [0, 1] (CT in HU: ``[-1000, 400]`` for lungs);
* ``percentile``: the volume's own ``low``-th and ``high``-th percentiles (numpy's linear method) to 0 and 1,
  clipped there (MRI, whose scale is arbitrary);
* ``zscore``: minus the volume's mean, over its standard deviation (population; a constant volume gives zeros);
* ``stored``: values as they are (a volume already prepared by another tool).

A volume whose range contradicts the HU window (one already scaled to [0, 1]; unsigned values with no air, as HU
stored with an offset and no scale/offset in the header) is refused with its file and range named:
:func:`check_window_range`.
"""

from __future__ import annotations

import numpy as np

from ddcnn.config import INTENSITIES as MODES  # noqa: F401 - the one list of modes, named here for the readers
from ddcnn.errors import DataError


def check_window_range(vol: np.ndarray, window: tuple[float, float], source: str) -> None:
    """Refuse values that cannot be Hounsfield units for a window of HU, naming ``source`` and the range.

    Two contradictions are caught: a volume already in [0, 1] under a window wider than 2 (every voxel would land
    in one grey level), and a volume with no value below 0 whose largest values pass the window's top while the
    window starts below 0 (CT always holds air near -1000 HU: no negative value means an offset, e.g. uint16 HU +
    1024 saved without ``scl_inter``).
    """
    low, high = window
    lo, hi = float(vol.min()), float(vol.max())
    if high - low > 2 and 0 <= lo < hi <= 1:
        raise DataError(f"{source} holds values in [{lo:g}, {hi:g}], already scaled, but data.intensity = window "
                        f"clips Hounsfield units to [{low:g}, {high:g}]: every voxel would get one grey level; set "
                        f"data.intensity: stored to take the values as they are")
    if low < 0 and lo >= 0 and hi > high:
        raise DataError(f"{source} holds values in [{lo:g}, {hi:g}] with none below 0, but CT in Hounsfield units "
                        f"holds air near -1000: the file seems to store HU plus an offset (e.g. 1024) without it in "
                        f"its header; write the offset into the header (NIfTI scl_inter, DICOM RescaleIntercept) or "
                        f"set data.intensity to percentile or zscore")


def apply_intensity(vol: np.ndarray, mode: str, window=None, percentiles=(0.5, 99.5)) -> np.ndarray:
    """``vol`` ``(D, H, W)`` float32 mapped by ``mode`` (see the module's docstring); float32 out."""
    if mode == "window":
        low, high = (float(v) for v in window)
        return ((np.clip(vol, low, high) - low) / (high - low)).astype(np.float32)
    if mode == "percentile":
        low, high = np.percentile(vol, [float(p) for p in percentiles])
        if high <= low:
            return np.zeros_like(vol, dtype=np.float32)
        return ((np.clip(vol, low, high) - low) / (high - low)).astype(np.float32)
    if mode == "zscore":
        mean, std = float(vol.mean(dtype=np.float64)), float(vol.std(dtype=np.float64))
        return ((vol - mean) / (std if std > 0 else 1.0)).astype(np.float32)
    return vol.astype(np.float32)
