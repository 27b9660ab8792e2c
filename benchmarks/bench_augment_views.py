"""Augmented views of taught photos (issue 18): does averaging a mirror (and crops) of each
registered photo into what a workspace stores, or training its head on those views, serve more
right answers than the plain prototypes?

Section `embed` (once; the slow part): the Lite2 photos bundle's ONNX embedder as served, one ORT
thread. Each photo is opened as the service opens an upload (`fewshot.data.imageio.open_image` with
the bundle's draft size, then `shrink_oriented`: EXIF orientation applied), the view is made on that
decoded picture, and the view goes through the served preprocessing (`to_array`: mode, resize, crop;
`model_input` inside the embedder). Views:

    orig      the photo (reused from bench_openset_photos' cache, checked against a recomputation)
    mirror    left-right mirror
    crop-c, crop-tl, crop-tr, crop-bl, crop-br
              the centre and the 4 corner crops of side 0.875 x the picture's, resized back by the
              preprocessing (the five-crop of ImageNet evaluation)

Photos: the first `--mini-per-class` of each miniImageNet *test* class and the first
`--cifar-per-class` test photos of each CIFAR-10 subset class (the same files, in the same order,
as bench_openset_photos embeds). One .npz per set and view in `.fewshot-cache/augment_views/`.

Section `evaluate` (NumPy / torch on the cache, one thread): fixed-seed episodes as bench_adapt draws
them (rng [seed, way, shot, episode]), way 5 and 10, shot 1, 5 and 10, 15 queries a class. The
decision is the photos bundle's (its manifest's head: cosine prototypes; the "shape" open-set rule
fitted on miniImageNet *validation* photos, as `build_photos_bundle` fits it: bench_adapt's
`bundle_decision`), applied with `fewshot.decision.decide` / `fit_memory` / `choose_head`. Compared:

    prototype                 stored = the photo's embedding (served today)
    prototype +mirror         stored = mean of photo and mirror embeddings (registration-time only)
    prototype +mirror+crops   stored = mean of every view embedded (photo, mirror and the crops)
    prototype TTA             stored = mean(photo, mirror); each query also mean(query, its mirror)
    logistic                  the probe (the bundle's C, max_iter) on the stored photos
    logistic on +mirror       the probe on stored = mean(photo, mirror)
    logistic, views +mirror   probe trained on photo and mirror as separate examples; the memory the
                              open-set rule reads (counts, spreads, prototypes) is the photos'
    logistic, views all       the same with every view embedded as examples
    adapted                   `choose_head` (prototype vs probe) on the stored photos
    adapted on +mirror        `choose_head` on stored = mean(photo, mirror)

"right" = answered with the photo's class and accepted (not "unknown"); "forced" = answered with its
class. Means over the episodes with 95% CI and paired differences against `prototype` (and each
probe / adapted variant against its own un-augmented form) with 95% CI.

    FEWSHOT_DATA=/work/shared/datasets nice -n 19 python benchmarks/bench_augment_views.py \
        --sections embed --views mirror crop-c --bundle /tmp/photos-bundles/efficientnet_lite2
    for S in mini-test cifar-test; do FEWSHOT_DATA=/work/shared/datasets nice -n 19 python \
        benchmarks/bench_augment_views.py --sections evaluate --sets $S --views mirror crop-c \
        --episodes 300 --head-episodes 40 --out /tmp/augv/eval-$S.json & done; wait
    python benchmarks/bench_augment_views.py --merge /tmp/augv/eval-mini-test.json /tmp/augv/eval-cifar-test.json

(The prototype variants cost milliseconds an episode; the probe and adapted ones a probe fit each and
five more for choose_head, so they run on the first --head-episodes of the same draws.)

ImageNet-1k trained the backbone's weights and covers miniImageNet's test classes: these are not
few-shot results in the benchmark's sense; they are what a workspace of such photos sees.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_adapt import bundle_decision  # noqa: E402
from bench_openset_photos import CACHE as OPENSET_CACHE  # noqa: E402

CACHE = ROOT / ".fewshot-cache" / "augment_views"
RESULTS = ROOT / "benchmarks" / "results"
VIEWS = ("orig", "mirror", "crop-c", "crop-tl", "crop-tr", "crop-bl", "crop-br")
CROP = 0.875
SETS = ("mini-test", "cifar-test")
CELLS = [(s, w, k) for s in SETS for w in (5, 10) for k in (1, 5, 10)]


# -- views, as a service would make them at registration ---------------------------------------------
def view_of(img: Any, view: str) -> Any:
    """A view of a decoded (oriented) PIL picture, before the model's preprocessing."""
    from PIL import Image

    if view == "orig":
        return img
    if view == "mirror":
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    w, h = img.size
    cw, ch = max(1, round(CROP * w)), max(1, round(CROP * h))
    x0 = {"c": (w - cw) // 2, "tl": 0, "bl": 0, "tr": w - cw, "br": w - cw}[view[5:]]
    y0 = {"c": (h - ch) // 2, "tl": 0, "tr": 0, "bl": h - ch, "br": h - ch}[view[5:]]
    return img.crop((x0, y0, x0 + cw, y0 + ch))


def decode_views(data: bytes, pre: Any, name: str, views: tuple[str, ...]) -> list[np.ndarray]:
    """Upload bytes -> uint8 (C, size, size) per view: opened as `decode_image` opens it, the view made
    on the decoded picture, then the served preprocessing (`to_array`)."""
    from fewshot.data.imageio import draft_size, open_image, shrink_oriented, to_array

    img = shrink_oriented(open_image(data, name=name, draft_to=draft_size(pre)), pre.resize_side)
    return [to_array(view_of(img, v), pre) for v in views]


def photo_bytes(data_root: Path, name: str, per_class: int) -> tuple[list[tuple[str, bytes]], list[str]]:
    """[(file name, bytes)] and their classes: the same files, in the same order, as bench_openset_photos."""
    from fewshot.artifacts.photos import cifar10_zip, miniimagenet_files

    if name == "mini-test":
        files = miniimagenet_files(data_root, "test", per_class)
        if files is None:
            raise SystemExit(f"no miniImageNet under {data_root}")
        return [nb for fs in files.values() for nb in fs], [c for c, fs in files.items() for _ in fs]
    zp = cifar10_zip(data_root)
    if zp is None:
        raise SystemExit(f"no CIFAR-10 subset under {data_root}")
    out: list[tuple[str, bytes]] = []
    cls: list[str] = []
    with zipfile.ZipFile(zp) as z:  # as fewshot.artifacts.photos.cifar10_images lists them
        by_class: dict[str, list[str]] = {}
        for n in sorted(n for n in z.namelist() if "/test/" in n and n.endswith(".jpg")):
            by_class.setdefault(n.split("/")[-2], []).append(n)
        for c, names in sorted(by_class.items()):
            out += [(n, z.read(n)) for n in names[:per_class]]
            cls += [c] * len(names[:per_class])
    return out, cls


def embed(bundle_dir: Path, data_root: Path, cache: Path, per_class: dict[str, int], views: tuple[str, ...],
          batch: int = 16) -> dict[str, Any]:
    """Every (set, view) not yet in `cache`; the originals from bench_openset_photos' cache when it
    has them (checked on 8 photos), else computed."""
    from fewshot.artifacts.bundle import load_bundle

    bundle = load_bundle(bundle_dir, verify_parity=False, intra_op_threads=1)
    pre, embedder = bundle.preprocessing, bundle.onnx_embedder
    cache.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"bundle": str(bundle_dir), "bundle_id": bundle.bundle_id,
                              "preprocessing": pre.to_dict(), "per_class": per_class, "sets": {}}
    photos = {s: photo_bytes(data_root, s, per_class[s]) for s in SETS}
    for s in SETS:
        named, cls = photos[s]
        rep = report["sets"].setdefault(s, {"images": len(named), "views": {}})
        old = OPENSET_CACHE / f"{s}.npz"
        if not (cache / f"{s}-orig.npz").exists() and old.exists():
            z = np.load(old)
            keep = np.concatenate([np.flatnonzero(z["cls"] == c)[:per_class[s]] for c in sorted(set(cls))])
            emb, ocls = z["emb"][keep], z["cls"][keep]
            check = np.linspace(0, len(named) - 1, 8).astype(int)
            fresh = embedder.embed(np.stack([decode_views(named[i][1], pre, named[i][0], ("orig",))[0]
                                             for i in check]))
            diff = float(np.abs(fresh - emb[check]).max())
            if list(ocls) != cls or diff > 1e-3:
                raise SystemExit(f"{old} does not hold these photos (max |diff| {diff}); delete it or embed afresh")
            np.savez(cache / f"{s}-orig.npz", emb=emb, cls=np.asarray(cls))
            rep["orig_from"] = f"{old} (8 photos recomputed: max |diff| {diff:.2e})"
    for v in views:  # view-major, mirror first: if time runs short, the last crops are what is missing
        for s in SETS:
            named, cls = photos[s]
            out = cache / f"{s}-{v}.npz"
            if out.exists():
                continue
            t0, c0, emb_s = time.perf_counter(), time.process_time(), 0.0
            chunks = []
            for i in range(0, len(named), batch):
                imgs = np.stack([decode_views(b, pre, n, (v,))[0] for n, b in named[i:i + batch]])
                e0 = time.process_time()
                chunks.append(embedder.embed(imgs))
                emb_s += time.process_time() - e0
            np.savez(out, emb=np.concatenate(chunks).astype(np.float32), cls=np.asarray(cls))
            report["sets"][s]["views"][v] = {"wall_s": round(time.perf_counter() - t0, 1),
                                             "cpu_s": round(time.process_time() - c0, 1),
                                             "embed_cpu_s": round(emb_s, 1),
                                             "embed_cpu_ms_per_image": round(1000 * emb_s / len(named), 1)}
            print(s, v, report["sets"][s]["views"][v], flush=True)
    report["cost"] = embed_cost(embedder, pre, photo_bytes(data_root, "mini-test", 1)[0][:5])
    return report


def embed_cost(embedder: Any, pre: Any, named: list[tuple[str, bytes]], repeats: int = 2) -> dict[str, Any]:
    """CPU seconds (one ORT thread) to decode and embed one upload as 1 view (served today), 2 views
    (photo + mirror, one batch) and 7 views (one batch): the registration cost per photo, and the
    per-classify cost of mirror TTA (2 views)."""
    out: dict[str, Any] = {"photos": len(named), "repeats": repeats}
    for label, views in (("1 view", VIEWS[:1]), ("2 views (photo + mirror)", VIEWS[:2]), ("7 views", VIEWS)):
        best = []
        for n, b in named:
            ts = []
            for _ in range(repeats):
                c0 = time.process_time()
                embedder.embed(np.stack(decode_views(b, pre, n, views)))
                ts.append(time.process_time() - c0)
            best.append(min(ts))
        out[label] = {"cpu_ms_median": round(1000 * float(np.median(best)), 1)}
        print("cost", label, out[label], flush=True)
    return out


# -- evaluation ------------------------------------------------------------------------------------
def load_views(cache: Path, s: str, views: tuple[str, ...]) -> list[dict[str, np.ndarray]]:
    """Per class (sorted by name): view -> (n, D) float32 of "orig" and those of `views` in the cache,
    the same photos in the same order."""
    zs = {v: np.load(cache / f"{s}-{v}.npz") for v in ("orig",) + views if (cache / f"{s}-{v}.npz").exists()}
    cls = zs["orig"]["cls"]
    for v, z in zs.items():
        if list(z["cls"]) != list(cls):
            raise SystemExit(f"{s}-{v}: its photos differ from {s}-orig's; delete the cache and embed again")
    return [{v: z["emb"][cls == c] for v, z in zs.items()} for c in sorted(set(cls.tolist()))]


def served_decision(bundle_dir: Path, cache: Path, seed: int, keep: Path) -> Any:
    """The bundle's manifest head with the open-set rules bench_adapt fits (mini-val, as the bundle
    build), kept in `keep` (json) once fitted."""
    from dataclasses import replace

    from fewshot.decision import BundleDecision, DecisionRule

    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    rule = DecisionRule.from_dict(manifest["decision"]["rule"])
    if keep.exists():
        return BundleDecision.from_dict(json.loads(keep.read_text()))
    decision = replace(bundle_decision(cache, seed), rule=rule)
    keep.write_text(json.dumps(decision.to_dict()))
    return decision


PROTOTYPES = ("prototype", "prototype +mirror", "prototype +mirror+crops", "prototype TTA (mirror)")
HEADS = ("logistic", "logistic, views +mirror", "logistic, views all", "adapted", "adapted +views")
BASE = {"logistic, views +mirror": "logistic", "logistic, views all": "logistic", "adapted +views": "adapted"}


def run_cell(decision: Any, pool: list[dict[str, np.ndarray]], way: int, shot: int, episodes: int,
             head_episodes: int, seed: int) -> dict[str, Any]:
    """Every variant on the same episodes: the prototype variants on `episodes`, the probe and adapted
    variants (a probe fit each, 5 more for choose_head) on the first `head_episodes` of them."""
    from fewshot.decision import ClassMemory, decide, fit_memory
    from fewshot.decision.heldout import choose_head
    from fewshot.training.evaluate import mean_ci95

    proto, probe = decision.served(head="prototype"), decision.served(head="probe")
    cands = [proto, probe]
    have = [v for v in VIEWS if v in pool[0]]  # the views embedded (orig, mirror, then the crops computed)
    crops = len(have) > 2
    names = [n for n in PROTOTYPES + HEADS if crops or not ("crops" in n or "views all" in n)]
    head_episodes = min(head_episodes, episodes)
    right = {n: np.full(episodes, np.nan) for n in names}
    forced = {n: np.full(episodes, np.nan) for n in names}
    chose = np.zeros(head_episodes)
    cpu = {"prototypes": 0.0, "heads": 0.0}
    yq = np.repeat(np.arange(way), 15)
    for e in range(episodes):
        rng = np.random.default_rng([seed, way, shot, e])  # bench_adapt's draws
        classes = rng.choice(len(pool), way, replace=False)
        picks = [rng.choice(len(pool[c]["orig"]), shot + 15, replace=False) for c in classes]
        s = {v: np.concatenate([pool[c][v][p[:shot]] for c, p in zip(classes, picks)]) for v in pool[0]}
        q = {v: np.concatenate([pool[c][v][p[shot:]] for c, p in zip(classes, picks)]) for v in ("orig", "mirror")}
        ys = np.repeat(np.arange(way), shot)
        s_om = (s["orig"] + s["mirror"]) / 2  # what registration would store: one embedding per photo
        q_om = (q["orig"] + q["mirror"]) / 2

        def score(name: str, d: Any, memory: Any, xq: np.ndarray, e: int = e) -> None:
            a = decide(d, memory, xq)
            right[name][e] = np.mean((a.label == yq) & a.known)
            forced[name][e] = np.mean(a.label == yq)

        c0 = time.process_time()
        score("prototype", proto, fit_memory(proto, s["orig"], ys, way), q["orig"])
        score("prototype +mirror", proto, fit_memory(proto, s_om, ys, way), q["orig"])
        score("prototype TTA (mirror)", proto, fit_memory(proto, s_om, ys, way), q_om)
        if crops:
            s_all = np.mean([s[v] for v in have], axis=0)
            score("prototype +mirror+crops", proto, fit_memory(proto, s_all, ys, way), q["orig"])
        c1 = time.process_time()
        cpu["prototypes"] += c1 - c0
        if e >= head_episodes:
            continue
        score("logistic", probe, fit_memory(probe, s["orig"], ys, way), q["orig"])
        # the probe trained on photo and mirror as separate examples; the open-set rule reads the photos' memory
        extra = fit_memory(probe, np.concatenate([s["orig"], s["mirror"]]), np.tile(ys, 2), way).probe
        score("logistic, views +mirror", probe, ClassMemory.of(s["orig"], ys, way, extra), q["orig"])
        if crops:
            extra = fit_memory(probe, np.concatenate([s[v] for v in have]), np.tile(ys, len(have)), way).probe
            score("logistic, views all", probe, ClassMemory.of(s["orig"], ys, way, extra), q["orig"])
        # adapted: choose_head on the stored photos (as POST /adapt); +views: the same choice, the chosen
        # head served with the mirror (prototype of mean(photo, mirror), or the probe with mirror examples)
        pick = choose_head(cands, s["orig"], ys, way).chosen == "probe"
        chose[e] = pick
        for name, (p_name, l_name) in (("adapted", ("prototype", "logistic")),
                                       ("adapted +views", ("prototype +mirror", "logistic, views +mirror"))):
            src = l_name if pick else p_name
            right[name][e], forced[name][e] = right[src][e], forced[src][e]
        cpu["heads"] += time.process_time() - c1

    def ci(v: np.ndarray) -> dict[str, Any]:
        v = v[~np.isnan(v)]
        if not v.size:
            return {"mean": None, "ci95": None, "episodes": 0}
        return {**dict(zip(("mean", "ci95"), mean_ci95(v))), "episodes": int(v.size)}

    def diffs(x: dict[str, np.ndarray], pairs: dict[str, str]) -> dict[str, Any]:
        return {n: ci(x[n] - x[b]) for n, b in pairs.items() if n in x and b in x}

    vs_proto = {n: "prototype" for n in names if n != "prototype"}
    return {"right": {n: ci(v) for n, v in right.items()}, "forced": {n: ci(v) for n, v in forced.items()},
            "right_minus_prototype": diffs(right, vs_proto), "forced_minus_prototype": diffs(forced, vs_proto),
            "right_minus_own_base": diffs(right, BASE), "forced_minus_own_base": diffs(forced, BASE),
            "prototype_on_head_episodes": {"right": ci(right["prototype"][:head_episodes]),
                                           "forced": ci(forced["prototype"][:head_episodes])},
            "chose_logistic": float(chose.mean()) if head_episodes else None,
            "cpu_s_per_episode": {"prototype variants": cpu["prototypes"] / episodes,
                                  "probe and adapted variants": cpu["heads"] / max(1, head_episodes)}}


def pct(x: dict[str, float], sign: bool = False) -> str:
    return f"{100 * x['mean']:{'+' if sign else ''}.2f} ± {100 * x['ci95']:.2f}"


def rows(r: dict[str, Any], names: list[str], label: dict[str, str]) -> list[str]:
    out = []
    for n in names:
        if n not in r["right"] or not r["right"][n]["episodes"]:
            continue
        base = n in r["right_minus_own_base"]
        cells = [str(r["right"][n]["episodes"]), pct(r["right"][n]),
                 pct(r["right_minus_prototype"][n], True) if n != "prototype" else "",
                 pct(r["right_minus_own_base"][n], True) if base else "", pct(r["forced"][n]),
                 pct(r["forced_minus_prototype"][n], True) if n != "prototype" else "",
                 pct(r["forced_minus_own_base"][n], True) if base else ""]
        out.append(f"| {label.get(n, n)} | " + " | ".join(cells) + " |")
    return out


def table(res: dict[str, Any]) -> str:
    out = []
    for key, r in res["cells"].items():
        s, w, k = key.split("/")
        h = r.get("heads")
        chose = "" if h is None or h["chose_logistic"] is None else \
            f"; adapted chose the probe in {100 * h['chose_logistic']:.0f}% of its episodes"
        out.append(f"**{s}, {w}-way {k}-shot** (n = episodes{chose})\n")
        out.append("| head | n | right | right - prototype | right - own base | forced | forced - prototype | "
                   "forced - own base |\n|---|---|---|---|---|---|---|---|")
        out += rows(r, list(PROTOTYPES), {})
        if h is not None:
            out += rows(h, ["prototype", *HEADS], {"prototype": "prototype (the same first episodes)"})
        out.append("")
    return "\n".join(out)


SUMMARY = [("prototype +mirror", "right_minus_prototype"), ("prototype +mirror+crops", "right_minus_prototype"),
           ("prototype TTA (mirror)", "right_minus_prototype"), ("logistic, views +mirror", "right_minus_own_base"),
           ("logistic, views all", "right_minus_own_base"), ("adapted +views", "right_minus_own_base")]


def summary(res: dict[str, Any]) -> str:
    """One row per cell: paired differences in right answers (percentage points, 95% CI)."""
    lines = ["| photos | way | shot | prototype (right) | " + " | ".join(
        f"{n} - {'prototype' if k == 'right_minus_prototype' else BASE[n]}" for n, k in SUMMARY) + " |",
        "|" + "---|" * (4 + len(SUMMARY))]
    for key, r in res["cells"].items():
        s, w, k = key.split("/")
        cells = []
        for n, kind in SUMMARY:
            src = r if n in PROTOTYPES else r.get("heads") or {}
            cells.append(pct(src[kind][n], True) if n in src.get(kind, {}) and src[kind][n]["episodes"] else "-")
        lines.append(f"| {s} | {w} | {k} | {pct(r['right']['prototype'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", default=["evaluate"], choices=["embed", "evaluate"])
    p.add_argument("--bundle", type=Path, default=Path("/tmp/photos-bundles/efficientnet_lite2"))
    p.add_argument("--data", type=Path, default=Path(os.environ.get("FEWSHOT_DATA", ROOT.parent / "shared/datasets")))
    p.add_argument("--cache", type=Path, default=CACHE)
    p.add_argument("--mini-per-class", type=int, default=40)
    p.add_argument("--cifar-per-class", type=int, default=100)
    p.add_argument("--views", nargs="+", default=list(VIEWS[1:]), choices=VIEWS[1:],
                   help="views to embed, in this order (section embed), and to evaluate when in the cache")
    p.add_argument("--episodes", type=int, default=300)
    p.add_argument("--head-episodes", type=int, default=100,
                   help="episodes (the first of each cell) for the probe and adapted variants")
    p.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS, help="sets to evaluate")
    p.add_argument("--merge", nargs="+", type=Path, help="results of evaluate runs to merge into --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "augment_views.json")
    args = p.parse_args()
    import onnxruntime
    import torch

    torch.set_num_threads(1)  # a script, not the library: one thread (a loaded 2-core machine)
    meta = {"command": "python benchmarks/bench_augment_views.py " + " ".join(sys.argv[1:]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": sys.version.split()[0],
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, 1 thread"}
    if "embed" in args.sections:
        rep = embed(args.bundle, args.data, args.cache,
                    {"mini-test": args.mini_per_class, "cifar-test": args.cifar_per_class}, tuple(args.views))
        path = args.cache / "embed_report.json"
        if path.exists():  # keep the timings of views embedded by earlier runs
            for s, r in json.loads(path.read_text()).get("sets", {}).items():
                rep["sets"][s]["views"] = {**r.get("views", {}), **rep["sets"][s]["views"]}
                if "orig_from" in r:
                    rep["sets"][s].setdefault("orig_from", r["orig_from"])
        path.write_text(json.dumps({**meta, **rep}, indent=2))
    if args.merge:  # cells of runs over different --sets, one result; nothing else runs
        runs = [json.loads(f.read_text()) for f in args.merge]
        cells = {k: v for r in runs for k, v in r["cells"].items()}
        merged: dict[str, Any] = {
            **runs[0], "command": [r["command"] for r in runs], "evaluate_wall_s": [r["evaluate_wall_s"] for r in runs],
            "photos_per_class": {k: v for r in runs for k, v in r["photos_per_class"].items()},
            "views": {k: v for r in runs for k, v in r["views"].items()},
            "cells": {f"{s}/{w}/{k}": cells[f"{s}/{w}/{k}"] for s, w, k in CELLS if f"{s}/{w}/{k}" in cells}}
        write(merged, args.out)
        return
    if "evaluate" in args.sections:
        decision = served_decision(args.bundle, OPENSET_CACHE, args.seed, args.cache / f"decision-seed{args.seed}.json")
        pools = {s: load_views(args.cache, s, tuple(args.views)) for s in args.sets}
        if len({tuple(p[0]) for p in pools.values()}) > 1:
            raise SystemExit(f"the sets have different views in {args.cache}: {[list(p[0]) for p in pools.values()]}")
        rep_path = args.cache / "embed_report.json"
        res: dict[str, Any] = {**meta, "episodes": args.episodes,
                               "head_episodes": min(args.head_episodes, args.episodes), "seed": args.seed,
                               "decision": {"rule": decision.rule.to_dict(),
                                            "open_set": {m: {k: v for k, v in r.to_dict().items() if k != "centre"}
                                                         for m, r in decision.open_set.items()}},
                               "photos_per_class": {s: len(p[0]["orig"]) for s, p in pools.items()},
                               "views": {s: list(p[0]) for s, p in pools.items()},
                               "embed_report": json.loads(rep_path.read_text()) if rep_path.exists() else None,
                               "cells": {}}
        t0 = time.perf_counter()
        todo = [(s, w, k) for s, w, k in CELLS if s in args.sets]
        # pass 1: the prototype variants (milliseconds an episode) on every episode; pass 2: the probe and
        # adapted variants on the first --head-episodes (the same draws); the json is rewritten after each cell
        for heads, (s, w, k) in [(False, c) for c in todo] + [(True, c) for c in todo if args.head_episodes]:
            c0 = time.perf_counter()
            key = f"{s}/{w}/{k}"
            if heads:
                res["cells"][key]["heads"] = run_cell(decision, pools[s], w, k, args.head_episodes,
                                                      args.head_episodes, args.seed)
            else:
                res["cells"][key] = run_cell(decision, pools[s], w, k, args.episodes, 0, args.seed)
            print(f"{s} {w}-way {k}-shot{' heads' if heads else ''}: {time.perf_counter() - c0:.0f} s", flush=True)
            res["evaluate_wall_s"] = round(time.perf_counter() - t0, 1)
            write(res, args.out, quiet=True)
        write(res, args.out)


def preamble(res: dict[str, Any]) -> str:
    """What was measured, in words: photos, views, episodes, the embedding cost."""
    rep = res.get("embed_report") or {}
    cost = rep.get("cost", {})
    costs = ", ".join(f"{k}: {v['cpu_ms_median']} ms" for k, v in cost.items() if isinstance(v, dict))
    views = sorted({v for vs in res["views"].values() for v in vs}, key=VIEWS.index)
    return (f"Augmented views of taught photos, Lite2 photos bundle ({rep.get('bundle_id', '?')}) ONNX embedder as "
            f"served; photos per class {res['photos_per_class']}; views {views} ('crops' = every crop view listed). "
            f"Right answers (correct and accepted by the bundle's open-set rule) and forced choice, % with 95% CI; "
            f"differences are paired (same episodes), percentage points. Prototype variants on "
            f"{res['episodes']} episodes a cell, probe and adapted variants on the first {res['head_episodes']} "
            f"(seed {res['seed']}, bench_adapt's draws, 15 queries a class). Embedding cost of one upload, CPU "
            f"time, one ORT thread, batch = its views ({cost.get('photos', '?')} miniImageNet photos, median): "
            f"{costs or 'not measured'}. torch {res['torch']}, onnxruntime {res['onnxruntime']}; {res['machine']}.")


def write(res: dict[str, Any], out: Path, quiet: bool = False) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    md = preamble(res) + "\n\n" + summary(res) + "\n\n" + table(res)
    out.with_suffix(".md").write_text(md + "\n")
    if not quiet:
        print(md)


if __name__ == "__main__":
    main()
