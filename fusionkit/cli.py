"""The ``fusionkit`` command: ``train``, ``evaluate``, ``predict``, ``list``, ``data``, ``explain``.

Errors fusionkit raises on purpose (bad config, bad data, bad checkpoint) print one line
``error: ...`` with a hint and exit with code 2; ``--debug`` shows the traceback.

Examples:
    $ fusionkit train --train data/train.csv --val data/val.csv --output runs/mine
    $ fusionkit evaluate --checkpoint runs/mine --data data/test.csv
    $ fusionkit predict --checkpoint runs/mine --image shirt.png --text "red striped tee" --json
    $ fusionkit predict --checkpoint runs/shop --input title="red tee" --input front=tee.png
    $ fusionkit data emoji --out data/emoji
    $ fusionkit data icons --out data/icons
    $ fusionkit explain --checkpoint runs/mine --image shirt.png --text "red tee" --out fig.png
    $ fusionkit explain --checkpoint runs/shop --input title="red tee" --input front=tee.png \\
          --text-input title --out fig.png
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["build_parser", "main"]

_HINTS = {
    "ConfigError": "check the config keys and values (see configs/quickstart.yaml)",
    "DataError": "check the manifest: a column per input (image, text), id and one per task",
    "CheckpointError": "point --checkpoint at a run folder or its best/ or last/ folder",
    "TrainingError": "lower train.lr or check the data; resume from last/ with --resume",
    "RegistryError": "run `fusionkit list` to see the registered components",
    "StorageError": "free disk space or fix permissions; the previous checkpoint is intact",
    "ShapeError": "check the inputs' shapes and types against the model's expectations",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fusionkit`` command.

    Returns:
        The parser with its subcommands.

    Examples:
        >>> build_parser().parse_args(["list", "model"]).kind
        'model'
    """
    parser = argparse.ArgumentParser(
        prog="fusionkit", description="Multimodal fusion (CMA-CLIP) from the command line."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or logs")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train",
        help="train a model",
        description="Train a model. Runs unchanged under torchrun (one process per device); "
        "data.batch_size is then the global batch and only rank 0 writes OUTPUT.",
    )
    train.add_argument("--config", help="run config YAML (model + data + train sections)")
    train.add_argument(
        "--preset",
        help="training recipe: fast (frozen encoders, cached features), medium (text encoder "
        "fine-tuned; the default without --config) or best (both fine-tuned); with --config "
        "it fills in what the config leaves out",
    )
    train.add_argument("--train", help="training manifest (overrides data.train)")
    train.add_argument(
        "--val",
        help="validation manifest (overrides data.val); without one, no epoch is validated and "
        "last/ holds the final weights",
    )
    train.add_argument("--tasks", help="comma-separated task columns (default: all)")
    train.add_argument("--output", default="runs/default", help="run folder")
    train.add_argument("--epochs", type=int, help="overrides train.epochs")
    train.add_argument("--seed", type=int, help="overrides train.seed")
    train.add_argument("--device", choices=("auto", "cpu", "cuda"), help="overrides train.device")
    train.add_argument("--resume", action="store_true", help="continue from OUTPUT/last")

    evaluate = commands.add_parser("evaluate", help="evaluate a checkpoint")
    evaluate.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    evaluate.add_argument("--data", help="manifest (default: the config's data.test)")
    evaluate.add_argument(
        "--precision", type=float, nargs="+", default=[0.9], help="precision(s) for recall@P"
    )
    evaluate.add_argument("--output", help="report path (default RUN/report.json)")
    evaluate.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    evaluate.add_argument("--json", action="store_true", help="print the report as JSON")

    predict = commands.add_parser("predict", help="predict with a checkpoint")
    predict.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    predict.add_argument("--image", help="image file")
    predict.add_argument("--text", help="text")
    predict.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a named input of the model: a text, or an image file for an image input "
        "(repeatable)",
    )
    predict.add_argument("--manifest", help="manifest to predict (with --out)")
    predict.add_argument("--out", help="output .csv or .jsonl for --manifest")
    predict.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    predict.add_argument("--json", action="store_true", help="print JSON")

    listing = commands.add_parser("list", help="list registered components")
    listing.add_argument("kind", nargs="?", help="component kind (default: all)")
    listing.add_argument("--pattern", default="*", help="fnmatch wildcard")
    _add_data_parser(commands)
    _add_explain_parser(commands)
    _add_serve_parser(commands)
    _add_export_parser(commands)
    return parser


def _add_data_parser(commands: Any) -> None:
    """Register ``fusionkit data <set>``: build (emoji, icons, synthetic) or convert a data set."""
    data = commands.add_parser("data", help="build or convert a data set into manifests")
    sets = data.add_subparsers(dest="dataset", required=True)
    emoji = sets.add_parser(
        "emoji", help="the emoji set, built offline from Debian packages (no download)"
    )
    emoji.add_argument("--out", required=True, help="output folder")
    emoji.add_argument("--seed", type=int, default=0, help="seed of the split")
    emoji.add_argument("--image-size", type=int, default=128, help="image side in pixels")
    emoji.add_argument("--skin-tones", action="store_true", help="add skin-tone variants")
    emoji.add_argument(
        "--drop-flag-prefix", action="store_true",
        help="remove 'flag:' from the texts of flags (it names their group)",
    )
    icons = sets.add_parser(
        "icons", help="the icons set, built offline from Debian icon themes (no download)"
    )
    icons.add_argument("--out", required=True, help="output folder")
    icons.add_argument("--seed", type=int, default=0, help="seed of the split")
    icons.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    icons.add_argument("--max-per-context", type=int, default=400,
                       help="keep at most this many icon names per context")
    synthetic = sets.add_parser(
        "synthetic", help="the synthetic catalogue (the data of synthetic:<split> and make demo)"
    )
    synthetic.add_argument("--out", required=True, help="output folder")
    synthetic.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    for split in ("train", "val", "test"):
        synthetic.add_argument(
            f"--{split}", type=int, help=f"{split} samples (default: as synthetic:{split})"
        )
    food = sets.add_parser("food101", help="convert a local copy of UPMC Food-101")
    food.add_argument("--root", required=True, help="folder holding images/ and texts/")
    food.add_argument("--out", required=True, help="output folder (manifests)")
    food.add_argument("--val-fraction", type=float, default=0.1,
                      help="share of the training rows held out for validation")
    food.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    fashion = sets.add_parser("fashiongen", help="convert local Fashion-Gen HDF5 files")
    fashion.add_argument("--train", required=True, help="the training .h5 file")
    fashion.add_argument("--val", required=True, help="the validation .h5 file (the test split)")
    fashion.add_argument("--out", required=True, help="output folder (PNG images + manifests)")
    fashion.add_argument("--val-fraction", type=float, default=0.05,
                         help="share of the training rows held out for validation")
    fashion.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    fashion.add_argument("--limit", type=int, help="convert at most this many rows per file")
    shard = sets.add_parser("shard", help="pack a manifest and its images into WebDataset tars")
    shard.add_argument("--manifest", required=True, help="the manifest (or a named source)")
    shard.add_argument("--out", required=True, help="output folder of the .tar shards")
    shard.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    shard.add_argument("--image-columns", nargs="+",
                       help="columns of image files (default: those whose cells all are)")


def _add_explain_parser(commands: Any) -> None:
    """Register ``fusionkit explain``: a word's attention over the image (the paper's Fig. 2)."""
    explain = commands.add_parser(
        "explain", help="draw where in the image a word of the text attended"
    )
    explain.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    explain.add_argument("--image", help="image file (of the model's one image input)")
    explain.add_argument("--text", help="text (of the model's one text input)")
    explain.add_argument(
        "--input", action="append", default=[], metavar="NAME=VALUE",
        help="a named input of the model: a text, or an image file (repeatable)",
    )
    explain.add_argument("--image-input", help="the image input to map (of several)")
    explain.add_argument("--text-input", help="the text input whose words to explain")
    explain.add_argument("--out", required=True, help="PNG to write")
    explain.add_argument("--token", help="word to explain (default: the most image-attending)")
    explain.add_argument("--layers", choices=("last", "mean"), default="last",
                         help="last fusion layer, or the mean over layers")
    explain.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))


def _add_serve_parser(commands: Any) -> None:
    """Register ``fusionkit serve``: an HTTP prediction server with micro-batching."""
    serve = commands.add_parser(
        "serve", help="serve a checkpoint over HTTP (POST /predict, GET /health, /metadata)",
        description="Serve a checkpoint over HTTP: POST /predict takes a multipart form (one "
        "field per model input: files for images, strings for texts) or JSON {\"samples\": "
        "[...]} (images as base64); concurrent requests are micro-batched. Needs "
        "pip install 'fusionkit[serve]'.",
    )
    serve.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    serve.add_argument("--port", type=int, default=8000, help="TCP port")
    serve.add_argument("--max-batch", type=int, default=32,
                       help="most samples per forward pass (1: no micro-batching)")
    serve.add_argument("--forward-batch", type=int, default=None,
                       help="samples per forward pass within a micro-batch (default: the "
                            "size with the least time per sample, measured at start)")
    serve.add_argument("--max-wait-ms", type=float, default=5.0,
                       help="how long a batch waits for more samples after its first")
    serve.add_argument("--max-body-mb", type=float, default=20.0,
                       help="largest request body in MiB (larger: 413)")
    serve.add_argument("--max-text-chars", type=int, default=10_000,
                       help="longest text per text input (longer: 400)")
    serve.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


def _serve(args: argparse.Namespace) -> int:
    from fusionkit.serving.server import ServeOptions, serve

    options = ServeOptions(
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_body_mb=args.max_body_mb,
        max_text_chars=args.max_text_chars, forward_batch=args.forward_batch,
    )
    serve(args.checkpoint, host=args.host, port=args.port, device=args.device, options=options,
          log_level="warning" if args.quiet else "info")
    return 0


def _add_export_parser(commands: Any) -> None:
    """Register ``fusionkit export``: a checkpoint as an ONNX graph with its preprocessing."""
    export = commands.add_parser(
        "export", help="export a checkpoint to ONNX (predict/evaluate take the export folder)",
        description="Export a checkpoint to OUT: model.onnx (tokenised texts and preprocessed "
        "images to per-task logits and modality weights), export.json, tokenizers. Needs pip "
        "install 'fusionkit[export]'.",
    )
    export.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    export.add_argument("--format", default="onnx", help="export format (only onnx for now)")
    export.add_argument("--out", required=True, help="export folder to write")
    export.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")


def _export(args: argparse.Namespace) -> int:
    from fusionkit.errors import ConfigError
    from fusionkit.serving.export import FORMATS, export_onnx

    if args.format not in FORMATS:
        raise ConfigError(f"--format {args.format!r}: unknown; known: {', '.join(FORMATS)}")
    out = export_onnx(args.checkpoint, args.out, opset=args.opset)
    print(f"exported: {out} (model.onnx, export.json)")
    return 0


def _train(args: argparse.Namespace) -> int:
    from fusionkit.training import Trainer, build_run_config, format_report
    from fusionkit.training.distributed import env_rank

    if env_rank() > 0:
        # Under torchrun only rank 0 reports; the other ranks log warnings and errors.
        logging.getLogger().setLevel(logging.WARNING)
    if args.config is None and args.train is None:
        from fusionkit.errors import ConfigError

        raise ConfigError("give --config, or --train (and --val)")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    config = build_run_config(
        args.config,
        train=args.train,
        val=args.val,
        tasks=tasks,
        epochs=args.epochs,
        seed=args.seed,
        device=args.device,
        preset=args.preset,
    )
    trainer = Trainer(config, args.output, resume=args.resume, progress=not args.quiet)
    result = trainer.fit()
    if env_rank() > 0:
        return 0
    last = result.history[-1] if result.history else {}
    if "val_mean_accuracy" not in last:
        print(f"trained {len(result.history)} epoch(s) without validation")
        print(f"checkpoint: {result.last_dir} (final weights)")
        return 0
    if trainer.val_report is not None:
        what = ("the blend of the best checkpoint and the unimodal models (members.json)"
                if trainer.val_report.get("members") else "best checkpoint")
        print(f"validation, {what}:\n{format_report(trainer.val_report)}")
    members = bool(trainer.val_report and trainer.val_report.get("members"))
    model = "the fused model: " if members else ""
    print(
        f"{model}trained {len(result.history)} epoch(s); best mean val accuracy "
        f"{result.best_score:.4f}; last {last['val_mean_accuracy']:.4f}"
    )
    print(f"checkpoints: {result.best_dir} (best), {result.last_dir} (last)")
    if members:
        from fusionkit.models.members import MEMBERS_DIR, MEMBERS_FILE

        print(f"unimodal models: {result.output_dir / MEMBERS_DIR}; the run folder "
              f"{result.output_dir} predicts as the blend of the three ({MEMBERS_FILE})")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from fusionkit.serving.export import is_export_dir
    from fusionkit.training import evaluate_checkpoint, format_report

    if is_export_dir(args.checkpoint):
        from fusionkit.serving import evaluate_export

        report = evaluate_export(
            args.checkpoint, args.data, precisions=args.precision, output=args.output
        )
    else:
        report = evaluate_checkpoint(
            args.checkpoint,
            args.data,
            precisions=args.precision,
            device=args.device,
            output=args.output,
        )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
        print(f"report: {report['report_path']}")
    return 0


def _named_inputs(items: Sequence[str]) -> dict[str, str]:
    """``--input NAME=VALUE`` arguments as input name → value."""
    from fusionkit.errors import ConfigError

    inputs = {}
    for item in items:
        name, equals, value = item.partition("=")
        if not equals or not name:
            raise ConfigError(f"--input {item!r}: expected NAME=VALUE")
        inputs[name] = value
    return inputs


def _predict(args: argparse.Namespace) -> int:
    from fusionkit.errors import ConfigError
    from fusionkit.serving import Predictor

    if args.manifest is None and args.image is None and args.text is None and not args.input:
        raise ConfigError(
            "give --image and/or --text, --input NAME=VALUE, or --manifest with --out"
        )
    if args.manifest is not None and args.out is None:
        raise ConfigError("--manifest needs --out (a .csv or .jsonl path)")
    predictor = Predictor.from_pretrained(args.checkpoint, device=args.device)
    if args.manifest is not None:
        done = predictor.predict_manifest(args.manifest, args.out, progress=not args.quiet)
        failed = f", {done.errors} with an error (see its error column)" if done.errors else ""
        print(f"predictions: {done.path} ({done.rows} rows{failed})")
        return 0
    inputs = {name: [value] for name, value in _named_inputs(args.input).items()}
    result = predictor.predict(
        images=[args.image] if args.image is not None and predictor.model.vision else None,
        texts=[args.text] if args.text is not None and predictor.model.text else None,
        inputs=inputs or None,
    )[0]
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for task, entry in result.items():
        label = entry.get("label") or ", ".join(entry.get("labels", [])) or "(none)"
        score = f" ({entry['score']:.3f})" if "score" in entry else ""
        shares = " ".join(f"{m}={w:.2f}" for m, w in entry["modality_weights"].items())
        print(f"{task}: {label}{score}  weights: {shares}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from fusionkit.registry import list_components

    listing: Any = list_components(args.kind, args.pattern)
    if isinstance(listing, list):
        listing = {args.kind: listing}
    for kind, names in listing.items():
        print(f"{kind}: {', '.join(names) if names else '(none)'}")
    return 0


def _data(args: argparse.Namespace) -> int:
    if args.dataset == "shard":
        from fusionkit.data.shard_writer import write_shards

        index = write_shards(args.manifest, args.out, shard_size=args.shard_size,
                             image_columns=args.image_columns)
        print(f"{index['pattern']} ({index['samples']} samples in {index['shards']} shards)")
        return 0
    if args.dataset == "emoji":
        from fusionkit.data.emoji import build_emoji_dataset

        paths = build_emoji_dataset(
            args.out,
            seed=args.seed,
            skin_tones=args.skin_tones,
            drop_flag_prefix=args.drop_flag_prefix,
            image_size=args.image_size,
            progress=not args.quiet,
        )
    elif args.dataset == "icons":
        from fusionkit.data import icons

        paths = icons.build_icons_dataset(
            args.out, seed=args.seed, image_size=args.image_size,
            max_per_context=args.max_per_context, progress=not args.quiet,
        )
    elif args.dataset == "synthetic":
        from fusionkit.data import generate_catalogue
        from fusionkit.data.sources import CATALOGUE

        sizes = {split: getattr(args, split) for split in ("train", "val", "test")}
        params = {**CATALOGUE, "seed": args.seed}
        params |= {split: size for split, size in sizes.items() if size is not None}
        paths = generate_catalogue(args.out, **params, progress=not args.quiet)
    elif args.dataset == "food101":
        from fusionkit.data.public import convert_food101

        paths = convert_food101(
            args.root, args.out, val_fraction=args.val_fraction, seed=args.seed,
            progress=not args.quiet,
        )
    else:
        from fusionkit.data.public import convert_fashiongen

        paths = convert_fashiongen(
            args.train, args.val, args.out, val_fraction=args.val_fraction, seed=args.seed,
            limit=args.limit, progress=not args.quiet,
        )
    for split, path in paths.items():
        print(f"{split}: {path} ({_row_count(path)} rows)")
    return 0


def _row_count(manifest: Any) -> int:
    """Data rows of a CSV manifest (quoted line breaks read as one row)."""
    import csv

    with open(manifest, newline="", encoding="utf-8") as handle:
        return sum(1 for _ in csv.reader(handle)) - 1


def _explain(args: argparse.Namespace) -> int:
    from fusionkit.serving import explain

    result = explain(
        args.checkpoint, args.image, args.text, args.out, token=args.token,
        layers=args.layers, device=args.device, inputs=_named_inputs(args.input),
        image_input=args.image_input, text_input=args.text_input,
    )
    print(f"token {result.token!r} over a {result.grid[0]}x{result.grid[1]} grid: {result.path}")
    for task, (label, probability) in result.predictions.items():
        shares = " ".join(f"{m}={w:.2f}" for m, w in result.modality_weights[task].items())
        print(f"{task}: {label} ({probability:.3f})  weights: {shares}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fusionkit`` command.

    Args:
        argv: Arguments (default ``sys.argv[1:]``).

    Returns:
        The exit code: 0 on success, 2 on a fusionkit error (one line on stderr).

    Examples:
        >>> main(["list", "model"])  # doctest: +SKIP
        model: cma_clip
    """
    # Before transformers or huggingface_hub are imported: never reach for the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from fusionkit.errors import FusionkitError

    handlers = {
        "train": _train,
        "evaluate": _evaluate,
        "predict": _predict,
        "list": _list,
        "data": _data,
        "explain": _explain,
        "serve": _serve,
        "export": _export,
    }
    try:
        return handlers[args.command](args)
    except FusionkitError as error:
        if args.debug:
            raise
        message = " ".join(str(error).split())
        hint = _HINTS.get(type(error).__name__, "run with --debug for the traceback")
        print(f"error: {message}\nhint: {hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
