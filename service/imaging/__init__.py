"""Image intake: header checks, CPU decode (Pillow) and device decode (torch / nvJPEG).

`headers` refuses what must never be decoded; `cpu` is the reference path, exact to timm's
eval transform; `device` decodes JPEG batches where the model runs. `preprocessing` holds the
configuration and geometry they share.
"""

from service.imaging.cpu import (
    DecodedImage,
    crop,
    decode_and_preprocess,
    decode_image,
    preprocess,
    to_rgb,
)
from service.imaging.errors import (
    CorruptImage,
    DegenerateImage,
    EmptyImage,
    ImageError,
    ImageTooLarge,
    TruncatedImage,
    UnsupportedFormat,
)
from service.imaging.headers import DEFAULT_FORMATS, Header, read_header, register_codecs
from service.imaging.preprocessing import (
    CROP_MODES,
    INTERPOLATIONS,
    Preprocessing,
    draft_size,
    resize_size,
)

__all__ = [
    "CROP_MODES",
    "DEFAULT_FORMATS",
    "INTERPOLATIONS",
    "CorruptImage",
    "DecodedImage",
    "DegenerateImage",
    "EmptyImage",
    "Header",
    "ImageError",
    "ImageTooLarge",
    "Preprocessing",
    "TruncatedImage",
    "UnsupportedFormat",
    "crop",
    "decode_and_preprocess",
    "decode_image",
    "draft_size",
    "preprocess",
    "read_header",
    "register_codecs",
    "resize_size",
    "to_rgb",
]
