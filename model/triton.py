"""Make an exported model folder a Triton Inference Server model too.

Triton reads `<model>/config.pbtxt` and numbered version folders (`<model>/1/model.onnx`), and
ignores the other files, so the folder hiera-serve loads can be handed to Triton unchanged:
the same artifact bytes (hard-linked where possible), the same tensor names and shapes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal

from model.artifacts import ModelRepository

TritonPlatform = Literal["onnxruntime_onnx", "pytorch_libtorch"]
CONFIG_FILE = "config.pbtxt"
LABELS_FILE = "labels.txt"
VERSION = "1"
PLATFORMS: dict[str, TritonPlatform] = {
    "onnx": "onnxruntime_onnx",
    "torchscript": "pytorch_libtorch",
}
_SOURCE_KIND = {"onnxruntime_onnx": "onnx", "pytorch_libtorch": "torchscript"}
_VERSION_FILE = {"onnxruntime_onnx": "model.onnx", "pytorch_libtorch": "model.pt"}


def tensor_names(platform: TritonPlatform) -> tuple[str, str, str]:
    """Return the (input, logits, embedding) tensor names Triton will expose."""
    if platform == "pytorch_libtorch":
        # TorchScript has no output names: Triton's PyTorch backend maps `<name>__<index>`
        # to the index-th output (and input), so the names carry the position.
        return "images__0", "logits__0", "embedding__1"
    return "images", "logits", "embedding"  # the ONNX graph's own names


def write_triton_layout(
    folder: str | Path,
    *,
    platform: TritonPlatform = "onnxruntime_onnx",
    max_batch_size: int = 8,
    max_queue_delay_us: int = 5000,
) -> Path:
    """Write config.pbtxt, 1/<artifact> and labels.txt into an exported model folder."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    repo = ModelRepository.load(folder)  # verified: never hand Triton a tampered artifact
    source = repo.artifact_path(_SOURCE_KIND[platform])
    version_dir = repo.path / VERSION
    version_dir.mkdir(exist_ok=True)
    _link_or_copy(source, version_dir / _VERSION_FILE[platform])
    (repo.path / LABELS_FILE).write_text("".join(f"{name}\n" for name in repo.labels))
    config = repo.path / CONFIG_FILE
    config.write_text(
        render_config(repo, platform=platform, max_batch_size=max_batch_size,
                      max_queue_delay_us=max_queue_delay_us)
    )  # fmt: skip
    return config


def render_config(
    repo: ModelRepository, *, platform: TritonPlatform, max_batch_size: int, max_queue_delay_us: int
) -> str:
    """Return config.pbtxt text (ModelConfig in protobuf text format) for `repo`."""
    m = repo.manifest
    config = model_config(
        name=m.name,
        platform=platform,
        tensor_names=tensor_names(platform),
        input_size=m.preprocessing.input_size,
        num_classes=m.num_classes,
        embed_dim=m.embed_dim,
        max_batch_size=max_batch_size,
        max_queue_delay_us=max_queue_delay_us,
    )
    return (
        f"# Written by hiera-export for {m.name} ({m.variant.timm_name}, weights: "
        f"{m.weights.kind}).\n"
        "# The model returns raw logits and the un-normalised pooled embedding; softmax and L2\n"
        "# normalisation are left to the client, as hiera-serve does them in its service layer.\n"
        + to_pbtxt(config)
    )


def model_config(
    *,
    name: str,
    platform: str,
    tensor_names: tuple[str, str, str],
    input_size: tuple[int, int],
    num_classes: int,
    embed_dim: int,
    max_batch_size: int,
    max_queue_delay_us: int,
) -> dict[str, Any]:
    """Return Triton's ModelConfig for the model, in protobuf's JSON mapping.

    The one source of the configuration: config.pbtxt is this rendered as text
    (`to_pbtxt`), and hiera-serve answers `/v2/models/{name}/config` (and gRPC ModelConfig)
    with it, so the two cannot disagree.
    """
    height, width = input_size
    images, logits, embedding = tensor_names
    # Without the batch axis: Triton prepends it when max_batch_size > 0.
    return {
        "name": name,
        "platform": platform,
        "max_batch_size": max_batch_size,
        "input": [{"name": images, "data_type": "TYPE_FP32", "dims": [3, height, width]}],
        "output": [
            {
                "name": logits,
                "data_type": "TYPE_FP32",
                "dims": [num_classes],
                "label_filename": LABELS_FILE,
            },
            {"name": embedding, "data_type": "TYPE_FP32", "dims": [embed_dim]},
        ],
        "dynamic_batching": {"max_queue_delay_microseconds": max_queue_delay_us},
        "version_policy": {"latest": {"num_versions": 1}},
    }


# ModelConfig fields whose values are enum names, written bare in text format.
_ENUM_FIELDS = {"data_type"}


def to_pbtxt(message: dict[str, Any], indent: str = "") -> str:
    """Render a message in protobuf's JSON mapping (as `model_config` returns) as text format."""
    lines = []
    for key, value in message.items():
        if isinstance(value, dict):
            lines.append(f"{indent}{key} {{\n{to_pbtxt(value, indent + '  ')}{indent}}}")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            items = ",\n".join(
                f"{indent}  {{\n{to_pbtxt(item, indent + '    ')}{indent}  }}" for item in value
            )
            lines.append(f"{indent}{key} [\n{items}\n{indent}]")
        elif isinstance(value, list):
            lines.append(f"{indent}{key}: [ {', '.join(_scalar(key, v) for v in value)} ]")
        else:
            lines.append(f"{indent}{key}: {_scalar(key, value)}")
    return "".join(f"{line}\n" for line in lines)


def _scalar(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and key not in _ENUM_FIELDS:
        return json.dumps(value)  # a quoted string with C-style escapes
    return str(value)


def _link_or_copy(source: Path, target: Path) -> None:
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)  # same bytes, no second copy on disk
    except OSError:
        shutil.copy2(source, target)  # across file systems
