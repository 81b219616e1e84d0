"""`hiera-export`: build a Hiera variant and write a verified model repository."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from model.export import ALL_FORMATS, DEFAULT_OPSET, ExportError, export_repository, parse_formats
from model.variants import get_variant, variant_names


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hiera-export",
        description="Export a Hiera model to ONNX and TorchScript with a checksummed manifest.",
    )
    parser.add_argument("--variant", choices=variant_names(), help="Hiera variant (timm name)")
    parser.add_argument(
        "--weights",
        help="'pretrained' (Hugging Face hub, cached), a local checkpoint path (timm, official "
        "facebookresearch/hiera or .safetensors), or 'random' (random init, for testing only)",
    )
    parser.add_argument(
        "--formats",
        default="onnx,torchscript",
        help=f"comma-separated subset of {','.join(ALL_FORMATS)} (default: onnx,torchscript)",
    )
    parser.add_argument(
        "--calibration-dir",
        type=Path,
        help="folder of real photos (JPEG/PNG) on which onnx_int8 must agree with fp32 "
        "(default: the photos shipped in model/calibration)",
    )
    parser.add_argument("--out", default="model_repository", help="repository root folder")
    parser.add_argument("--name", help="model folder name (default: the variant name)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset")
    parser.add_argument("--seed", type=int, default=0, help="seed for --weights random")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    parser.add_argument("--list-variants", action="store_true", help="print the catalogue")
    parser.add_argument(
        "--triton",
        nargs="?",
        const="onnx",
        choices=("onnx", "torchscript"),
        help="also make the folder a Triton Inference Server model: config.pbtxt, 1/model.onnx "
        "(or 1/model.pt with 'torchscript') and labels.txt",
    )
    parser.add_argument(
        "--triton-max-batch-size", type=int, default=8, help="Triton max_batch_size (default 8)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the exporter; return a process exit code."""
    args = _parser().parse_args(argv)
    console = Console(stderr=True)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.list_variants:
        # Rich assumes 80 columns when piped, which truncates the table.
        _print_catalogue(Console(width=None if sys.stdout.isatty() else 140))
        return 0
    if not args.variant or not args.weights:
        console.print("[red]error:[/] --variant and --weights are required (see --help)")
        return 2
    try:
        formats = parse_formats(args.formats)
    except ValueError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    if args.triton and args.triton not in formats:
        console.print(f"[red]error:[/] --triton {args.triton} needs {args.triton} in --formats")
        return 2

    from model.hiera import WeightsUnavailable, build

    started = time.perf_counter()
    try:
        with console.status("building model") as status:
            built = build(args.variant, args.weights, seed=args.seed)

            def on_step(message: str) -> None:
                status.update(message)
                console.log(message)

            target = export_repository(
                built,
                args.out,
                formats=formats,
                name=args.name,
                opset=args.opset,
                overwrite=args.overwrite,
                on_step=on_step,
                calibration_dir=args.calibration_dir,
            )
        if args.triton:
            from model.triton import PLATFORMS, write_triton_layout

            platform = PLATFORMS[args.triton]
            config = write_triton_layout(
                target, platform=platform, max_batch_size=args.triton_max_batch_size
            )
            console.log(f"wrote Triton model {config.parent} ({platform})")
    except (ExportError, WeightsUnavailable, ValueError) as exc:
        console.print(f"[red]export failed:[/] {exc}")
        return 1
    _print_summary(console, target, time.perf_counter() - started)
    return 0


def _print_summary(console: Console, target: object, seconds: float) -> None:
    from model.artifacts import ModelRepository

    repo = ModelRepository.load(str(target))
    manifest = repo.manifest
    if manifest.weights.kind == "random":
        console.print("[bold yellow]RANDOM WEIGHTS[/]: this export is for testing only")
    table = Table(title=f"{target} ({seconds:.1f} s)")
    columns = ("artifact", "precision", "MB", "emb max|Δ|", "logit max|Δ|", "min cos", "top-1")
    for column in columns:
        table.add_column(column)
    for kind, art in manifest.artifacts.items():
        size = (f"{kind} ({art.file})", art.precision, f"{art.bytes / 1e6:.1f}")
        if art.agreement is not None:  # reduced precision: measured on real photos
            agree = art.agreement
            table.add_row(
                *size,
                "-",
                "-",
                f"{agree.embedding_min_cosine:.6f} ({agree.photos} photos)",
                f"{agree.top1_agreement:.2f}",
            )
            continue
        parity = art.parity
        assert parity is not None  # export_repository records parity or agreement
        table.add_row(
            *size,
            f"{parity.embedding_max_abs:.2e}",
            f"{parity.logits_max_abs:.2e}",
            f"{parity.embedding_min_cosine:.6f}",
            "-",
        )
    for mode, agree in manifest.autocast.items():  # runtime modes: no artifact of their own
        verdict = "" if agree.passed else " [red]under the bound: refused at serving[/]"
        table.add_row(
            f"{mode} (autocast)",
            "bf16",
            "-",
            "-",
            "-",
            f"{agree.embedding_min_cosine:.6f} ({agree.photos} photos){verdict}",
            f"{agree.top1_agreement:.2f}",
        )
    console.print(table)


def _print_catalogue(console: Console) -> None:
    table = Table(title="Hiera variants")
    table.add_column("variant", no_wrap=True)
    for column in ("input", "embed dim", "classes", "params M", "GFLOPs", "top-1"):
        table.add_column(column)
    table.add_column("weights licence")
    for name in variant_names():
        v = get_variant(name)
        paper = v.paper
        table.add_row(
            name,
            f"{v.input_size[0]}x{v.input_size[1]}",
            str(v.embed_dim),
            str(v.num_classes),
            f"{paper.params_m:g}" if paper else "-",
            f"{paper.flops_g:g}" if paper else "-",
            f"{paper.top1:.1f}" if paper else "-",
            v.license,
        )
    console.print(table)


if __name__ == "__main__":
    sys.exit(main())
