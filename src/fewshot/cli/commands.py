"""The commands of `fewshot`, one function each: thin layers over the library API. Their
arguments are in `fewshot.cli.parser`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from fewshot.artifacts.byo import bundle_from_onnx, read_folder
from fewshot.artifacts.export import Int8Export, export_run
from fewshot.artifacts.manifest import Manifest
from fewshot.artifacts.zoo import get_entry, is_zoo_name, list_entries, zoo_root
from fewshot.config import EvalConfig, RunConfig, config_from_dict, load_config
from fewshot.data.download import download_omniglot
from fewshot.data.imageio import Preprocessing
from fewshot.data.leakage import check_leakage
from fewshot.distill import distill
from fewshot.episodes import EpisodeSpec, describe_episode, episode_rng, materialise
from fewshot.episodes.grid import episode_grid
from fewshot.episodes.sampling import DomainMode
from fewshot.errors import ConfigError, DataError
from fewshot.precision import keep_freed_memory
from fewshot.service.app import serve
from fewshot.service.standalone import export_stored_workspace
from fewshot.training.data import load_run_data, prepare_data
from fewshot.training.distributed import World, process_group
from fewshot.training.loop import train
from fewshot.training.protocol import evaluate_run
from fewshot.training.runs import check_run_dir, resolve_device
from fewshot.workflows.compare import compare_runs
from fewshot.workflows.pipeline import run_pipeline
from fewshot.workflows.tune import tune
from fewshot.workflows.zoo import (
    entry_data,
    entry_table,
    evaluate_bundle,
    evaluate_entry,
    publish,
    rescore,
)


def _training_process() -> None:
    """What a command that trains or evaluates sets for its whole process (never library code):
    glibc keeps freed tensor memory for the next step (`fewshot.precision.keep_freed_memory`; 1.8x
    the Conv-4 training steps of benchmarks/bench_throughput.py on this CPU)."""
    keep_freed_memory()


def _run_config(args: argparse.Namespace) -> RunConfig:
    """The command's config file with its `key.sub=value` overrides (and --data as data.root)."""
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.root={args.data}")
    return load_config(args.config, overrides)


def _data_config(args: argparse.Namespace) -> Any:
    """The data section from command-line options, validated like a config file's."""
    given = {"dataset": args.dataset, "image_size": args.size, "mode": args.mode, "cache_dir": args.cache_dir,
             "split": getattr(args, "split", None), "splits_dir": args.splits_dir, "first_level": args.first_level,
             "min_images_per_class": getattr(args, "min_images", 2), "root": args.data or None}
    fields = {k: v for k, v in given.items() if v is not None}  # absent: the dataset's defaults apply
    return config_from_dict({"data": fields}, "<command line>").data


def cmd_prepare(args: argparse.Namespace) -> int:
    cfg = _data_config(args)
    if args.download:

        if cfg.dataset != "omniglot":
            raise DataError(f"--download fetches the Omniglot zips only; put dataset {cfg.dataset!r} in place "
                            "by hand (for miniimagenet: see the error `fewshot prepare --dataset miniimagenet` gives)")

        download_omniglot(cfg.data_root())
    prepared = prepare_data(cfg, force=args.force)
    print(prepared.report.table())
    print(f"cache: {prepared.cache.path} ({len(prepared.cache)} images, {len(prepared.cache.classes)} classes, "
          f"{len(prepared.cache.domains)} domains)")
    if args.report:
        prepared.report.save(args.report)
        print(f"report: {args.report}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:

    data = load_run_data(_data_config(args), progress=True)
    cache = data.cache
    counts = cache.counts()
    print(f"cache {cache.path}: {len(cache)} images, {len(cache.classes)} classes, {len(cache.domains)} domains; "
          f"images per class min {counts.min()} / median {int(np.median(counts))} / max {counts.max()}")
    print(f"{'domain':40s} {'classes':>8s} {'images':>8s}")
    per_dom: dict[str, list[int]] = {}
    for c in cache.classes:
        per_dom.setdefault(c.domain, []).append(c.count)
    for d, cs in sorted(per_dom.items()):
        print(f"{d:40s} {len(cs):8d} {sum(cs):8d}")
    print(f"\nsplit scheme {data.scheme!r}:")
    for name, split in data.splits.items():
        n_dom = len({cache.classes[int(i)].domain for i in split.class_ids})
        print(f"  {name:6s} {len(split.class_ids):6d} classes from {n_dom} domains")
    leak = check_leakage(cache, data.splits)
    print(f"leakage check: passed ({leak})")
    for warning in leak.warnings[:5]:
        print(f"  warning: {warning}")
    split = args.episode_split if args.episode_split in data.splits else next(iter(data.splits))
    desc = describe_episode(data.pool(split), EpisodeSpec(args.way, args.shot, args.query), episode_rng(args.seed, 0))
    out = episode_grid(materialise(cache, desc), Path(args.out))
    print(f"episode grid ({split}, {args.way}-way {args.shot}-shot): {out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    _training_process()

    config = _run_config(args)
    with _launch(config) as world:  # one process, or a rank of `torchrun --nproc-per-node N -m fewshot train`
        result = train(config, resume=not args.no_resume, world=world)
    if not world.is_main:
        return 0
    val = f"{100 * result.best_val_acc:.2f}%" if result.best_val_acc >= 0 else "n/a (no validation split)"
    procs = f" on {world.size} processes" if world.distributed else ""
    print(f"trained to step {result.steps}{procs} ({result.elapsed_s:.1f} s in this session); best validation "
          f"accuracy {val}; run folder {result.run_dir}")
    return 0


def _launch(config: Any) -> Any:
    """The process group of a torchrun launch (gloo on CPU, NCCL on CUDA) around a command."""
    world = World.from_env()
    return process_group(world, resolve_device(config.train.device).type)


def cmd_distill(args: argparse.Namespace) -> int:
    _training_process()

    config = _run_config(args)
    with _launch(config) as world:
        summary = distill(config, resume=not args.no_resume, world=world)
    if not world.is_main:
        return 0
    for name, run in summary["runs"].items():
        print(f"{name}: {run}")
    if "report" in summary:
        print((Path(summary["report"]) / "distill_report.md").read_text(encoding="utf-8"))
        print(f"report: {summary['report']}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    _training_process()

    res = tune(_run_config(args), trials=args.trials, storage=args.storage,
               study_name=args.study, timeout=args.timeout)
    counts = ", ".join(f"{n} {state}" for state, n in sorted(res.counts.items()))
    print(f"study {res.study_name!r} ({res.storage}): {counts}")
    if res.best_value is not None:
        print(f"best validation accuracy {100 * res.best_value:.2f}% with "
              + ", ".join(f"{k}={v}" for k, v in res.best_params.items()))
    for name, path in res.files.items():
        print(f"{name}: {path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    if is_zoo_name(args.run):  # a zoo bundle, scored as served on its card's protocol

        card = get_entry(args.run).card()
        tasks: list[tuple[int, int, DomainMode]] = (
            [(args.way or 5, args.shot or 1, args.mode or "any")] if args.way or args.shot else
            [(r["way"], r["shot"], r["mode"]) for r in card["results"]])  # default: the card's table
        data = entry_data(get_entry(args.run), progress=True)
        for way, shot, mode in tasks:
            res = evaluate_entry(args.run, way=way, shot=shot, mode=mode, episodes=args.episodes, query=args.query,
                                 seed=args.seed, data=data)
            print(f"{args.run} as served (ONNX Runtime + its decision rule): {res.summary()}")
        return 0

    bundle = (Path(args.run) / "manifest.json").is_file()
    if not bundle:

        check_run_dir(Path(args.run))
    # a run's eval section, unless given on the command line (a bundle: the protocol's defaults)
    ev = EvalConfig() if bundle else load_config(Path(args.run) / "config.yaml").eval
    way, shot = args.way or ev.way, args.shot or ev.shot
    query, episodes = args.query or ev.query, args.episodes or ev.episodes
    seed, split, mode = ev.seed if args.seed is None else args.seed, args.split or ev.split, args.mode or ev.domain_mode
    if bundle:  # a bundle folder, scored as served

        res = evaluate_bundle(args.run, way=way, shot=shot, query=query, episodes=episodes, seed=seed, split=split,
                              mode=mode)
        print(f"{args.run} as served (ONNX Runtime + its decision rule): {res.summary()}")
        return 0

    _training_process()
    res = evaluate_run(args.run, way=way, shot=shot, query=query, episodes=episodes, seed=seed, split=split,
                       mode=mode, device=args.device)
    print(res.summary())
    if args.per_domain:
        for d, acc in res.per_domain.items():
            print(f"  {d:40s} {100 * acc:6.2f}%")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    print(compare_runs([Path(r) for r in args.runs], Path(args.out)))
    print(f"\nplot: {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    int8 = Int8Export(calibration_images=args.calibration_images) if args.int8 else None
    out = export_run(Path(args.run), Path(args.out), force=args.force, int8=int8)
    manifest = Manifest.read(out)
    rule = (manifest.deployment or {}).get("rule", {})
    print(f"bundle written to {out} (embedder: {(manifest.deployment or {}).get('embedder')}, rule: "
          f"{rule.get('rule')}/{rule.get('metric')})")
    for key, m in manifest.metrics.items():
        print(f"  {key}: learner {100 * m['mean']:.2f}%, bundle as served {100 * m['served_mean']:.2f}% "
              f"+- {100 * m['served_ci95']:.2f} ({m['episodes']} episodes)")
    for key, a in (manifest.deployment or {}).get("int8", {}).get("accuracy", {}).items():
        print(f"  {key}: served int8 {100 * a['int8']:.2f}% against fp32 {100 * a['fp32']:.2f}% (same episodes)")
    return 0


def cmd_bundle_onnx(args: argparse.Namespace) -> int:
    pre = Preprocessing(mode=args.mode, size=args.size, resample=args.resample, crop=args.crop,
                        mean=args.mean, std=args.std)
    labelled = read_folder(Path(args.calibrate), pre, labelled=True) if args.calibrate else None
    samples = read_folder(Path(args.samples), pre, labelled=False)[""] if args.samples else None
    out = bundle_from_onnx(args.model, args.out, preprocessing=pre, samples=samples, labelled=labelled,
                           metric=args.metric)
    print(f"bundle written to {out}; serve it with `fewshot serve {out}`"
          + ("" if labelled else " (no --calibrate folder: unknown images are not rejected)"))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers} must be at least 1")
    serve(args.bundles, db_url=args.db, host=args.host, port=args.port, admin_key=args.admin_key,
          workers=args.workers)
    return 0


def cmd_export_workspace(args: argparse.Namespace) -> int:
    out = export_stored_workspace(args.db, args.workspace, args.bundles, args.out)
    print(f"standalone classifier written to {out} (model.onnx + labels.json; runs on ONNX Runtime alone)")
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    if args.zoo_command in (None, "list"):

        entries = list_entries()
        if not entries:
            print(f"no zoo entries in {zoo_root()}")
            return 0
        print(entry_table(entries))
        print(f"\nserve one: fewshot serve zoo:{entries[0].name}   (cards: {zoo_root()}/<entry>/MODEL.md)")
        return 0
    if args.zoo_command == "publish":

        entry = publish(args.recipe, replace=args.replace, episodes=args.episodes)
        print((entry.path / "MODEL.md").read_text(encoding="utf-8"))
        print(f"entry written to {entry.path}")
        return 0

    entry = get_entry(args.name)
    rows = rescore(entry, entry_data(entry, progress=True), episodes=args.episodes)
    for r in rows:
        print(f"{r['key']}: {100 * r['mean']:.2f}% on the first {r['episodes']} episodes, recorded "
              f"{100 * r['recorded_mean']:.2f}% (card: {100 * r['card_mean']:.2f} +- {100 * r['card_ci95']:.2f})")
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    _training_process()

    summary = run_pipeline(_run_config(args), serve_check=not args.no_serve_check)
    print(json.dumps(summary, indent=2))
    return 0

