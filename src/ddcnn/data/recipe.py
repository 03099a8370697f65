"""The preprocessing recipe of an exported model's input: from a file on disk to the float tensor the model takes,
step by step, as ``ddcnn predict`` (:func:`ddcnn.train.evaluate.read_input`) and the dataset readers prepare it.

An export's sidecar carries it under ``preprocessing``, so that a client in any language can make the input from
the recipe alone. Its ``schema`` counts its versions: 1 had no recipe (a sidecar without ``schema``), 2 is this one.
"""

from __future__ import annotations

SCHEMA = 2


def input_recipe(dataset: str, image_size: list[int], channels: int, window: list[float] | None) -> dict:
    """The recipe for a run of ``dataset`` whose models take ``(B, channels, *image_size)``; ``window``: the
    intensity window of a volume folder (the only dataset that uses one)."""
    shape = ["B", channels, *image_size]
    steps: list[dict]
    if dataset == "volume-folder":  # reading, frame, intensity and spacing: the sidecar's own volumes recipe
        return {"schema": SCHEMA, "from": "a 3D volume file (.npy, NIfTI) or a DICOM series folder",
                "steps": "the sidecar's `volumes` entry (ddcnn.data.volumes.VolumeRecipe), as ddcnn predict applies "
                         "it", "layout": "(B, 1, D, H, W)", "shape": shape, "normalisation": "inside the model"}
    if len(image_size) == 3:
        steps = [{"step": "read", "how": ".npy as stored (D, H, W); NIfTI (.nii, .nii.gz) stored (X, Y, Z), "
                                         "transposed to (Z, Y, X)", "dtype": "float32"}]
        if dataset == "volume-folder":
            low, high = window or (0.0, 1.0)
            steps += [{"step": "window", "how": "clip to [low, high], then (v - low) / (high - low)", "low": low,
                       "high": high},
                      {"step": "resize", "how": "trilinear interpolation to (D, H, W) = size, corners not aligned "
                                                "(torch.nn.functional.interpolate, align_corners=False)",
                       "size": image_size}]
        else:
            steps += [{"step": "check", "how": "taken as it is: must already be (D, H, W) = size", "size": image_size}]
        return {"schema": SCHEMA, "from": "a 3D volume file", "steps": steps, "layout": "(B, 1, D, H, W)",
                "shape": shape, "value_range": [0.0, 1.0], "normalisation": "inside the model"}
    mode = "RGB" if channels == 3 else "L"
    steps = [
        {"step": "decode", "how": "Pillow Image.open; 16-bit grey (mode I;16 or I) divided by 257 and rounded to "
                                  "8 bits"},
        {"step": "colour", "how": f"Pillow Image.convert({mode!r}): " + (
            "grey replicated to R, G, B; an alpha channel dropped" if mode == "RGB" else
            "colour to grey as L = R * 299/1000 + G * 587/1000 + B * 114/1000 (ITU-R 601-2)"), "mode": mode},
        {"step": "fit", "how": "scale the shorter side to the target and crop about the centre, keeping the aspect "
                               "ratio: Pillow ImageOps.fit(image, (W, H), method=Image.Resampling.BILINEAR, "
                               "centering=(0.5, 0.5))", "size": image_size, "interpolation": "bilinear"},
        {"step": "to_array", "how": "uint8 pixels to float32 divided by 255, channels first",
         "channel_order": "RGB" if channels == 3 else "grey"},
    ]
    return {"schema": SCHEMA, "from": "an image file (PNG, JPEG, BMP, TIFF, WebP...)", "steps": steps,
            "layout": f"(B, {channels}, H, W)", "shape": shape, "value_range": [0.0, 1.0],
            "normalisation": "inside the model", "mode": mode, "size": image_size}
