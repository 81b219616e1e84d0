"""Expected answers built without the service: Pillow, timm's eval transform, timm's forward.

Nothing here imports `service`: a bug in the served path's decoding, resizing, cropping,
normalisation, model feeding or postprocessing changes the service's answer but not these.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import create_transform, resolve_data_config
from timm.models.hiera import Hiera

from model.hiera import BuiltModel

PHOTO = Path(__file__).resolve().parents[2] / "examples" / "grace_hopper.jpg"  # 512 x 600 RGB

# The fp32 ONNX graph, served in batches of 1..4, against eager timm on one image: 1.2e-6 at
# export (the manifest's parity figure), at most 1.6e-6 through the API on these photos. One
# input pixel moved by one 8-bit level moves the micro model's embedding by 1.5e-5, so this
# tells an exact preprocessing from a nearly-right one.
EMBEDDING_ATOL = 1e-5


def upright_rgb(data: bytes) -> Image.Image:
    """Decode every pixel (no draft), turn it upright per EXIF, and convert it to RGB."""
    with Image.open(io.BytesIO(data)) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


@functools.cache
def _eval_transform(backbone: Hiera) -> Callable[[Image.Image], torch.Tensor]:
    # The model's own pretrained_cfg: not the manifest, not service.imaging.Preprocessing.
    return create_transform(**resolve_data_config(model=backbone))


def transform(built: BuiltModel, image: Image.Image) -> torch.Tensor:
    """Return timm's eval transform of an RGB image, as float32 [1, 3, H, W]."""
    return _eval_transform(built.module.backbone)(image)[None]


def model_input(built: BuiltModel, data: bytes) -> torch.Tensor:
    """Return timm's eval transform of an encoded image, as float32 [1, 3, H, W]."""
    return transform(built, upright_rgb(data))


def timm_outputs(built: BuiltModel, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Return timm's (logits [C], embedding [D]) for one model input [1, 3, H, W]."""
    backbone = built.module.backbone
    with torch.inference_mode():
        features = backbone.forward_features(pixels)
        embedding = backbone.forward_head(features, pre_logits=True)
        logits = backbone.forward_head(features)
    return logits[0].numpy(), embedding[0].numpy()


def reference(built: BuiltModel, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Return timm's (logits [C], embedding [D]) for one encoded image, unbatched."""
    return timm_outputs(built, model_input(built, data))


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Return torch's float64 softmax of a [C] logit row."""
    return torch.softmax(torch.from_numpy(logits).double(), dim=-1).numpy()


def top_indices(logits: np.ndarray, k: int) -> list[int]:
    """Return the k largest logits' indices, best first, ties by lower index."""
    return [int(i) for i in torch.from_numpy(-logits).sort(stable=True).indices[:k]]


def unit(embedding: np.ndarray) -> np.ndarray:
    """Return the embedding scaled to unit L2 norm, in float64."""
    wide = embedding.astype(np.float64)
    return wide / np.sqrt((wide * wide).sum())


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@functools.cache
def photos() -> dict[str, tuple[bytes, str]]:
    """Return real photos as (encoded bytes, content type), in the forms uploads come in.

    Every size needs a resize and a crop (down, up, portrait, landscape, tall); one is stored
    sideways with an EXIF orientation, one is greyscale, one a palette PNG.
    """
    with Image.open(PHOTO) as source:
        hopper = source.convert("RGB")
    lanczos = Image.Resampling.LANCZOS
    landscape = hopper.resize((500, 375), lanczos)
    sideways = Image.Exif()
    sideways[0x0112] = 6  # viewers rotate it 90 degrees clockwise to show it upright
    return {
        "jpeg-512x600": (_encode(hopper, "JPEG", quality=92), "image/jpeg"),
        "png-500x375": (_encode(landscape, "PNG"), "image/png"),
        "png-160x120-upscaled": (_encode(hopper.resize((160, 120), lanczos), "PNG"), "image/png"),
        "jpeg-300x900-tall": (_encode(hopper.resize((300, 900), lanczos), "JPEG"), "image/jpeg"),
        "jpeg-greyscale": (_encode(hopper.convert("L"), "JPEG"), "image/jpeg"),
        "jpeg-exif-rotated": (
            _encode(landscape.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=sideways),
            "image/jpeg",
        ),
        "png-palette": (_encode(landscape.convert("P"), "PNG"), "image/png"),
    }
