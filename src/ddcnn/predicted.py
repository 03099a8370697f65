"""A run's predicted class per test image, packed compactly for results.json: the bootstrap over seeds *and* test
images (:mod:`ddcnn.study.frontier`) needs every image's prediction, not only the accuracy.

``pack_classes([3, 0, 9, ...]) -> "u1:eJz..."``: one byte per image (two for more than 256 classes), zlib,
base64 -- about 5 KB for the 10,000 test images of Fashion-MNIST instead of 30 KB as a JSON list.
"""

from __future__ import annotations

import base64
import zlib
from collections.abc import Sequence

_WIDTHS = {"u1": 1, "u2": 2}


def pack_classes(classes: Sequence[int]) -> str:
    """``(M,)`` class indices from 0 to 65535 -> text."""
    tag = "u1" if max(classes, default=0) < 256 else "u2"
    data = b"".join(int(c).to_bytes(_WIDTHS[tag], "little") for c in classes)
    return f"{tag}:{base64.b64encode(zlib.compress(data, 9)).decode()}"


def unpack_classes(text: str) -> list[int]:
    """What :func:`pack_classes` packed; a ValueError for text it did not write."""
    tag, _, payload = text.partition(":")
    if tag not in _WIDTHS:
        raise ValueError(f"packed classes start with u1: or u2:, not {tag[:8]!r}")
    try:
        data = zlib.decompress(base64.b64decode(payload, validate=True))
    except (ValueError, zlib.error) as err:
        raise ValueError(f"packed classes are damaged ({err})") from None
    width = _WIDTHS[tag]
    if len(data) % width:
        raise ValueError("packed classes are damaged (a partial entry)")
    return [int.from_bytes(data[i:i + width], "little") for i in range(0, len(data), width)]
