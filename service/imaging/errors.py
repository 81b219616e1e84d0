"""What the imaging package refuses, as domain errors the service maps to 4xx responses."""

from typing import ClassVar


class ImageError(Exception):
    """An upload the service refuses to decode; the message says what is wrong and how to fix it."""

    code: ClassVar[str] = "invalid_image"


class EmptyImage(ImageError):
    """The request carried no image bytes."""

    code: ClassVar[str] = "empty_image"


class UnsupportedFormat(ImageError):
    """The bytes are not an image, or an image in a format outside the allowlist."""

    code: ClassVar[str] = "unsupported_format"


class ImageTooLarge(ImageError):
    """The image has more pixels than the service is willing to decode."""

    code: ClassVar[str] = "image_too_large"


class CorruptImage(ImageError):
    """The image is in an accepted format but its data is truncated or undecodable."""

    code: ClassVar[str] = "corrupt_image"


class DegenerateImage(ImageError):
    """The image's declared shape is impossible to use: a zero side or an extreme aspect ratio."""

    code: ClassVar[str] = "degenerate_image"


class TruncatedImage(ImageError):
    """The image data ends before the canvas its header declares is filled."""

    code: ClassVar[str] = "truncated_image"
