"""A client outside ddcnn: an exported ONNX model, its sidecar and a raw .nii.gz -> class probabilities.

It uses nibabel, numpy and ONNX Runtime only (no torch, no ddcnn) and follows the sidecar's ``volumes`` recipe step
by step. Usage: ``python outside_client.py MODEL.onnx SCAN.nii.gz``; prints the probabilities as JSON.
"""

import json
import sys

import nibabel
import numpy as np
import onnxruntime
from nibabel import orientations


def linear(a: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    """Linear interpolation along ``axis`` to ``n_out`` samples with half-voxel centres (align_corners=False, no
    antialiasing): source position ``(i + 0.5) * n_in / n_out - 0.5``, clamped at 0."""
    n_in = a.shape[axis]
    if n_in == n_out:
        return a
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(int), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    shape = [1] * a.ndim
    shape[axis] = n_out
    w = (src - lo).reshape(shape)
    return np.take(a, lo, axis) * (1 - w) + np.take(a, hi, axis) * w


def prepare(path: str, recipe: dict) -> np.ndarray:
    image = nibabel.load(path)
    vol = np.asarray(image.dataobj, dtype=np.float32)  # nibabel applies scl_slope and scl_inter
    while vol.ndim > 3 and vol.shape[-1] == 1:
        vol = vol[..., 0]
    # canonical orientation: flips and axis swaps, then (Z, Y, X) = (D, H, W)
    turn = orientations.ornt_transform(orientations.io_orientation(image.affine),
                                       orientations.axcodes2ornt(tuple(recipe["orientation"])))
    affine = image.affine @ orientations.inv_ornt_aff(turn, vol.shape)
    vol = orientations.apply_orientation(vol, turn).transpose(2, 1, 0)
    own = nibabel.affines.voxel_sizes(affine)[::-1]
    # intensity
    if recipe["intensity"] == "window":
        low, high = recipe["window"]
        vol = (np.clip(vol, low, high) - low) / (high - low)
    elif recipe["intensity"] == "percentile":
        low, high = np.percentile(vol, recipe["percentiles"])
        vol = np.clip((vol - low) / (high - low), 0, 1)
    elif recipe["intensity"] == "zscore":
        vol = (vol - vol.mean(dtype=np.float64)) / (vol.std(dtype=np.float64) or 1.0)
    vol = vol.astype(np.float32)
    size = recipe["size"]
    if recipe["fit"] == "resize":
        for axis, n in enumerate(size):
            vol = linear(vol, axis, n)
        return vol
    # resample to the spacing, then crop or pad about the centre with the minimum
    for axis, (n, o, t) in enumerate(zip(vol.shape, own, recipe["spacing"])):
        vol = linear(vol, axis, max(1, int(round(n * o / t))))
    fill = vol.min()
    for axis, want in enumerate(size):
        n = vol.shape[axis]
        if n > want:
            vol = np.take(vol, np.arange((n - want) // 2, (n - want) // 2 + want), axis)
        elif n < want:
            pad = [(0, 0)] * 3
            pad[axis] = ((want - n) // 2, want - n - (want - n) // 2)
            vol = np.pad(vol, pad, constant_values=fill)
    return vol


def main(model: str, scan: str) -> None:
    with open(model + ".json") as f:
        meta = json.load(f)
    x = prepare(scan, meta["volumes"])[None, None].astype(np.float32)
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    probabilities = session.run(None, {"images": x})[0][0]
    assert "torch" not in sys.modules and "ddcnn" not in sys.modules
    print(json.dumps({c: float(p) for c, p in zip(meta["classes"], probabilities)}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
