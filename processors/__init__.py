"""The built-in processors (see :mod:`processors.registry`).

OpenCV's own pixel cap is the backstop under :func:`processors.image.decode_image`'s
header check: OpenCV refuses to decode an image of more pixels than
``OPENCV_IO_MAX_IMAGE_PIXELS`` (its default is 2**30). OpenCV reads that
variable once, when ``cv2`` is first imported, so it has to be in the
environment before then: :func:`cap_opencv_pixels` puts it there, and the
registry calls it with the route's ``max_pixels`` before building an image
route imports OpenCV.
"""

from __future__ import annotations

import os
import sys
from typing import Final

OPENCV_PIXEL_CAP: Final = "OPENCV_IO_MAX_IMAGE_PIXELS"


def cap_opencv_pixels(max_pixels: int) -> None:
    """Have OpenCV refuse images over ``max_pixels`` pixels.

    Effective only before ``cv2`` is first imported in this process, and only
    when the operator has not set ``OPENCV_IO_MAX_IMAGE_PIXELS`` themselves
    (their value wins).
    """
    if "cv2" not in sys.modules:
        os.environ.setdefault(OPENCV_PIXEL_CAP, str(max_pixels))
