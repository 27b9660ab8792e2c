"""The `fewshot` command line: its argument table and `main`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from fewshot.cli.commands import (
    cmd_bundle_onnx,
    cmd_compare,
    cmd_distill,
    cmd_evaluate,
    cmd_export,
    cmd_export_workspace,
    cmd_inspect,
    cmd_pipeline,
    cmd_prepare,
    cmd_serve,
    cmd_train,
    cmd_tune,
    cmd_zoo,
)
from fewshot.errors import FewshotError


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="data root (default: $FEWSHOT_DATA)")
    p.add_argument("--dataset", default="omniglot",
                   help="'omniglot', 'miniimagenet', or a path to an image folder or zip")
    p.add_argument("--size", type=int, default=None,
                   help="image side in pixels (default: the dataset's; 28, miniimagenet 84)")
    p.add_argument("--mode", choices=["L", "RGB"], default=None, help="default: the dataset's (L, miniimagenet RGB)")
    p.add_argument("--splits-dir", default=None,
                   help="folder of split files train.csv / val.csv / test.csv (filename,label) for the image "
                        "folder or zip (default for miniimagenet: <data>/miniimagenet/splits/ravi)")
    p.add_argument("--cache-dir", default=".fewshot-cache")
    p.add_argument("--first-level", choices=["domain", "subset"], default="domain",
                   help="image folders: is root/<X>/<class> a knowledge domain or a subset (train/test)?")


def _config_command(sub: Any, name: str, help: str, example: str | None) -> argparse.ArgumentParser:
    """A command that runs a YAML config: its path, key.sub=value overrides and the data root."""
    p: argparse.ArgumentParser = sub.add_parser(name, help=help)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help=example and f"key.sub=value overrides, e.g. {example}")
    p.add_argument("--data", help="data root (default: $FEWSHOT_DATA)")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fewshot", description="Few-shot image recognition toolkit")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="sources -> cleaning report -> packed cache")
    _add_data_args(p)
    p.add_argument("--force", action="store_true", help="rebuild even if an up-to-date cache exists")
    p.add_argument("--download", action="store_true", help="download the official Omniglot zips first")
    p.add_argument("--min-images", type=int, default=2, help="drop classes with fewer kept images")
    p.add_argument("--report", help="also write the cleaning report JSON here")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("inspect", help="domains, classes, counts, splits, and a PNG of an episode")
    _add_data_args(p)
    p.add_argument("--split", default=None,
                   help="split scheme: lake | vinyals | csv | domains | classes (default: vinyals; "
                        "csv for miniimagenet or with --splits-dir)")
    p.add_argument("--episode-split", default="train")
    p.add_argument("--way", type=int, default=5)
    p.add_argument("--shot", type=int, default=1)
    p.add_argument("--query", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="episode.png")
    p.set_defaults(func=cmd_inspect)

    p = _config_command(sub, "train", "train a learner from a YAML config", "train.steps=500")
    p.add_argument("--no-resume", action="store_true", help="start over even if the run has a checkpoint")
    p.set_defaults(func=cmd_train)

    p = _config_command(sub, "distill", "distil teachers into a student (same checkpoints and resume as train)",
                        "distill.temperature=2")
    p.add_argument("--no-resume", action="store_true", help="start over even if the runs have checkpoints")
    p.set_defaults(func=cmd_distill)

    p = _config_command(sub, "tune", "Optuna search over the config's tune.space, scored on validation classes",
                        "train.steps=500 tune.seed=1")
    p.add_argument("--trials", type=int, required=True, help="trials to add to the study in this process")
    p.add_argument("--storage", default=None,
                   help="study storage URL: postgresql://user:PASSWORD@host/db to share a study between workers, "
                        "or sqlite:///path (default: <output_dir>/<name>-tune/study.db)")
    p.add_argument("--study", default=None, help="study name (default: the config's name)")
    p.add_argument("--timeout", type=float, default=None, help="start no new trial after this many seconds")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("evaluate", help="mean accuracy +- 95%% CI over fixed-seed test episodes")
    p.add_argument("run", help="a run folder (its best checkpoint), a bundle folder or zoo:NAME (as served)")
    p.add_argument("--way", type=int, default=None,
                   help="default: the run's eval section; for zoo:NAME without --way / --shot, the card's whole table")
    p.add_argument("--shot", type=int, default=None)
    p.add_argument("--query", type=int, default=None, help="queries per class (default: the run's eval section, "
                                                             "the zoo card's, else 15)")
    p.add_argument("--episodes", type=int, default=None, help="default: the run's eval section, the card's, else 1000")
    p.add_argument("--seed", type=int, default=None, help="default: the run's eval section, the card's, else 1234")
    p.add_argument("--split", default=None, help="default: the run's eval section, else test")
    p.add_argument("--mode", choices=["any", "within", "across"], default=None,
                   help="within: all classes of an episode from one domain (Lake's within-alphabet)")
    p.add_argument("--device", default="auto")
    p.add_argument("--per-domain", action="store_true", help="print the per-domain breakdown")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="markdown table and bar plot of evaluated runs")
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", default="compare.png")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("export", help="bundle a trained run: safetensors + manifest + ONNX")
    p.add_argument("run")
    p.add_argument("out")
    p.add_argument("--force", action="store_true",
                   help="write the bundle even if it scores more than export.max_drop below the learner "
                        "(or, with --int8, the int8 model more than 1 point below fp32)")
    p.add_argument("--int8", action="store_true",
                   help="also write an int8 model (ONNX Runtime static quantisation on training images) and serve it")
    p.add_argument("--calibration-images", type=int, default=256,
                   help="training images that calibrate the int8 activation ranges (default 256, at least 32)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bundle-onnx", help="a bundle from your own ONNX feature extractor (images -> (N, D))")
    p.add_argument("model", help="ONNX model: float32 input (N, C, S, S), output (N, D)")
    p.add_argument("--size", type=int, required=True, help="image side S the model takes")
    p.add_argument("--mode", choices=["L", "RGB"], required=True, help="L: 1 channel, RGB: 3 channels")
    p.add_argument("--mean", type=float, nargs="+", default=None, help="per-channel mean of x / 255 (one per channel)")
    p.add_argument("--std", type=float, nargs="+", default=None, help="per-channel std of x / 255 (one per channel)")
    p.add_argument("--resample", default="bilinear", help="resize filter (default bilinear)")
    p.add_argument("--crop", type=float, default=1.0, help="centre-crop fraction, e.g. 0.875 (default 1: none)")
    p.add_argument("--metric", choices=["cosine", "euclidean"], default="cosine",
                   help="nearest-prototype metric the service uses (default cosine)")
    p.add_argument("--out", required=True, help="bundle folder to write (must not exist)")
    p.add_argument("--calibrate", default=None,
                   help="labelled folder (one subfolder of images per class) for the unknown-image threshold")
    p.add_argument("--samples", default=None, help="folder of images for the self-check (default: --calibrate's)")
    p.set_defaults(func=cmd_bundle_onnx)

    p = sub.add_parser("serve", help="run the recogniser service on one or more bundles (models)")
    p.add_argument("bundles", nargs="+", metavar="BUNDLE",
                   help="bundle folder, zoo:NAME (a zoo entry), or NAME=PATH to serve it under another model name; "
                        "the first is the default")
    p.add_argument("--db", default="fewshot.db", help="SQLite path or postgresql:// URL (default: fewshot.db)")
    p.add_argument("--admin-key", default=None, help="admin key (default: $FEWSHOT_ADMIN_KEY)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes (default 1); on Linux each listens on its own socket of the port, so "
                        "connections spread over them; one per core is the usual choice")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export-workspace", help="a taught workspace as one standalone ONNX classifier + labels.json")
    p.add_argument("bundles", nargs="+", metavar="BUNDLE", help="the bundles the service serves (as given to serve)")
    p.add_argument("--db", required=True, help="the service's store: SQLite path or postgresql:// URL")
    p.add_argument("--workspace", required=True, help="workspace id (ws_...)")
    p.add_argument("--out", required=True, help="output folder for model.onnx and labels.json")
    p.set_defaults(func=cmd_export_workspace)

    p = sub.add_parser("zoo", help="trained models with their cards: list, publish a recipe's run, re-score")
    p.set_defaults(func=cmd_zoo, zoo_command=None)
    zsub = p.add_subparsers(dest="zoo_command")
    zsub.add_parser("list", help="the entries and their accuracy as served (the default)")
    z = zsub.add_parser("publish", help="export, score as served and card the run of a zoo recipe")
    z.add_argument("recipe", help="a config with a zoo section, e.g. configs/zoo/omniglot_protonet_conv4.yaml")
    z.add_argument("--replace", action="store_true", help="publish over an existing entry")
    z.add_argument("--episodes", type=int, default=None, help="episodes per setting (default: the recipe's)")
    z = zsub.add_parser("rescore", help="score an entry again as served and compare with its card")
    z.add_argument("name", help="entry name (or zoo:NAME)")
    z.add_argument("--episodes", type=int, default=None, help="only the first N episodes of each setting")

    p = _config_command(sub, "pipeline", "prepare -> train -> evaluate -> export -> service check", None)
    p.add_argument("--no-serve-check", action="store_true")
    p.set_defaults(func=cmd_pipeline)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except FewshotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; completed checkpoints and caches are intact", file=sys.stderr)
        return 130
