"""Open-set ("unknown") rejection on photo episodes, for any number of classes and shots (issue 18 item 2).

Section `embed` (once; the slow part): the photos bundle's ONNX embedder, as served (uploads decoded
by `fewshot.data.imageio.decode_image` under the bundle's preprocessing), embeds a bounded number of
photos per class into an ignored cache folder:

    mini-val     miniImageNet validation classes (16)   FIT the open-set rules here, and only here
    mini-test    miniImageNet test classes (20)         CHECK: taught classes of the test episodes
    mini-train   miniImageNet training classes (64)     CHECK: untaught queries of the test episodes
                                                        (20 test classes leave none untaught at 20-way)
    cifar-test   CIFAR-10 subset, test photos (10)      CHECK: taught and untaught (5-way at most 9)

Section `evaluate` (NumPy on the cache, minutes): open-set episodes of N taught classes with K
examples each, 15 queries per taught class and 15 of one untaught class, answered by the served
decision (`fewshot.decision.decide`, cosine prototypes as the photos bundle serves); candidate rules
are fitted on mini-val episodes only and reported on mini-test and CIFAR episodes. "Kept" = share of
the queries forced choice answers correctly that the rule accepts; "rejected" = share of untaught
queries answered "unknown". Target: kept >= 95% and rejected >= 80% at 5/10/20-way x 1/5-shot.

    FEWSHOT_DATA=../shared/datasets nice -n 15 python benchmarks/bench_openset_photos.py --sections embed \
        --bundle /tmp/photos-bundles/efficientnet_lite2
    nice -n 15 python benchmarks/bench_openset_photos.py --sections evaluate

Numbers on miniImageNet are not few-shot results in the benchmark's sense (ImageNet-1k trained the
weights); they are what a workspace of such photos sees.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".fewshot-cache" / "openset_photos"
RESULTS = ROOT / "benchmarks" / "results"
SETS = {"mini-val": ("val", 100), "mini-test": ("test", 100), "mini-train": ("train", 30), "cifar-test": ("cifar", 100)}


def embed_sets(bundle_dir: Path, data_root: Path, cache: Path, batch: int = 16) -> dict[str, Any]:
    """Embed every set of `SETS` not yet in `cache` (one .npz per set: emb (N, D) float32, cls (N,) str)."""
    from fewshot.artifacts.bundle import load_bundle
    from fewshot.artifacts.photos import cifar10_images, cifar10_zip, miniimagenet_files
    from fewshot.data.imageio import decode_image

    bundle = load_bundle(bundle_dir, verify_parity=False)
    pre, embedder = bundle.preprocessing, bundle.onnx_embedder
    cache.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"bundle": str(bundle_dir), "bundle_id": bundle.bundle_id, "sets": {}}
    for name, (split, per_class) in SETS.items():
        out = cache / f"{name}.npz"
        if out.exists():
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        if split == "cifar":
            zp = cifar10_zip(data_root)
            if zp is None:
                raise SystemExit(f"no CIFAR-10 subset under {data_root}")
            by_class = cifar10_images(zp, "test", per_class, pre)
            images = np.concatenate(list(by_class.values()))
            cls = np.concatenate([[c] * len(v) for c, v in by_class.items()])
        else:
            files = miniimagenet_files(data_root, split, per_class)
            if files is None:
                raise SystemExit(f"no miniImageNet under {data_root}")
            images = np.stack([decode_image(b, pre, name=n) for fs in files.values() for n, b in fs])
            cls = np.concatenate([[c] * len(fs) for c, fs in files.items()])
        emb = np.concatenate([embedder.embed(images[i:i + batch]) for i in range(0, len(images), batch)])
        np.savez(out, emb=emb.astype(np.float32), cls=cls.astype(str))
        report["sets"][name] = {"images": len(emb), "classes": len(set(cls.tolist())),
                                "wall_s": round(time.perf_counter() - t0, 1),
                                "cpu_s": round(time.process_time() - c0, 1)}
        print(name, report["sets"][name], flush=True)
    return report


def load_set(cache: Path, name: str) -> list[np.ndarray]:
    """[(n_i, D) float32] per class of a cached set, classes sorted by name."""
    z = np.load(cache / f"{name}.npz")
    emb, cls = z["emb"], z["cls"]
    return [emb[cls == c] for c in sorted(set(cls.tolist()))]


TARGET_TA, TARGET_REJ = 0.95, 0.80
CHECK_CELLS = [("mini-test", w, k) for w in (5, 10, 20) for k in (1, 5, 10)] + \
              [("cifar-test", w, k) for w in (2, 5) for k in (1, 5, 10)]
TARGET_CELLS = {(s, w, k) for s, w, k in CHECK_CELLS if s == "mini-test" and k in (1, 5)} | \
               {("cifar-test", 5, 1), ("cifar-test", 5, 5)}


def fit_candidates(val: list[np.ndarray], rng: np.random.Generator) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every candidate rule, fitted on the validation classes only -> (name -> OpenSetRule, report)."""
    from fewshot.artifacts.calibration import fit_open_set_rules, fit_shape_rule
    from fewshot.decision import OpenSetRule

    rules, report, _ = fit_open_set_rules(val, rng, n_way=5, n_shot=5, n_query=15, n_episodes=300)
    g = report["measured"]["cosine"]["global"]["threshold"]
    raw_shape, raw_rep = fit_shape_rule(val, rng, centre=np.zeros(val[0].shape[1]), fitted_on="mini-val, raw")
    shape, shape_rep = fit_shape_rule(val, rng, fitted_on="miniImageNet validation classes")
    cands = {"global (one threshold, 5w5s)": OpenSetRule("global", "cosine", g),
             "spread (shipped for characters)": rules["cosine"],
             "shape, raw cosine": raw_shape,
             "shape, centred cosine": shape,
             "global, centred cosine": None}  # filled below: one threshold fitted at 5w5s on the centred base
    cells = {(c["way"], c["shot"]): c for c in shape_rep["cells"]}
    base_t = cells[(5, 5)]["threshold"]  # 1 - centred cos keeping SHAPE_KEEP at 5w5s
    from dataclasses import replace
    cands["global, centred cosine"] = replace(shape, coefficients=(float(np.log(base_t)), 0.0, 0.0, 0.0))
    return cands, {"spread_global": report, "shape_raw": raw_rep, "shape": shape_rep}


def loo_threshold(rule: Any, support: np.ndarray, n_way: int, n_shot: int, q: float) -> float:
    """Self-calibration: the `q` quantile of the held-out novelty of the stored examples (each
    judged by its own class without it), or the rule's threshold when no class has 2 examples."""
    from fewshot.decision import DecisionRule, LeaveOneOut, ServedDecision, decide

    if n_shot < 2:
        return float(rule.threshold)
    y = np.repeat(np.arange(n_way), n_shot)
    a = decide(ServedDecision(DecisionRule("prototype", "cosine"), rule), LeaveOneOut.of(support, y, n_way), support)
    assert a.novelty is not None
    return float(np.quantile(a.novelty[a.label == y], q))


def check_cell(cands: dict[str, Any], sets: dict[str, list[np.ndarray]], untaught: list[np.ndarray], name: str,
               way: int, shot: int, episodes: int, seed: int) -> dict[str, Any]:
    """All candidates on the same `episodes` episodes of one cell -> name -> kept / rejected."""
    from fewshot.artifacts.calibration import served_episodes
    from fewshot.decision import DecisionRule, ServedDecision

    pool = sets[name]
    extra = untaught if name == "mini-test" else None
    out: dict[str, Any] = {}
    for cname, rule in cands.items():
        d = ServedDecision(DecisionRule("prototype", "cosine"), rule)
        e = served_episodes(d, pool, np.random.default_rng([seed, way, shot]), n_way=way, n_shot=shot, n_query=15,
                            n_episodes=episodes, untaught=extra)
        out[cname] = e.operating_point(rule.threshold)
        if cname == "shape, centred cosine":  # the best any one threshold on this novelty could do here
            k, u = e.novelty[e.correct], e.novelty[~e.known]
            t95 = float(np.quantile(k, 0.95))
            out["oracle: best threshold on these episodes, centred"] = {
                "true_accept": 0.95, "unknown_rejection": float((u > t95).mean()), "accuracy": out[cname]["accuracy"]}
        if cname == "global (one threshold, 5w5s)":  # ratio test: (1 - cos_1) / (1 - cos_2), threshold below
            out["_ratio"] = {"nov": e.novelty / (1 - e.second), "known": e.known, "correct": e.correct}
    return out


def self_calibrated(rule: Any, pool: list[np.ndarray], untaught: list[np.ndarray] | None, way: int, shot: int,
                    episodes: int, seed: int, q: float) -> dict[str, float]:
    """Per workspace threshold from its own stored examples (`loo_threshold`), the same episodes."""
    from fewshot.decision import ClassMemory, DecisionRule, ServedDecision, decide

    rng = np.random.default_rng([seed, way, shot])
    kept, rejected = [], []
    d = ServedDecision(DecisionRule("prototype", "cosine"), rule)
    src = untaught if untaught is not None else pool
    need = way + (1 if untaught is None else 0)
    for _ in range(episodes):  # the same draws as served_episodes
        chosen = rng.choice(len(pool), size=need, replace=False)
        xs = [pool[c][rng.permutation(len(pool[c]))] for c in chosen[:way]]
        other = src[int(chosen[way]) if untaught is None else int(rng.integers(len(src)))]
        support = np.concatenate([x[:shot] for x in xs]).astype(np.float32)
        queries = [x[shot:shot + 15] for x in xs] + [other[rng.permutation(len(other))[:15]]]
        labels = np.concatenate([np.full(len(x), i) for i, x in enumerate(queries)])
        t = loo_threshold(rule, support, way, shot, q)
        a = decide(d, ClassMemory.of(support, np.repeat(np.arange(way), shot), way), np.concatenate(queries))
        assert a.novelty is not None
        ok = a.novelty <= t
        kept.append(ok[(labels < way) & (a.label == labels)])
        rejected.append(~ok[labels == way])
    return {"true_accept": float(np.concatenate(kept).mean()), "unknown_rejection": float(np.concatenate(rejected).mean())}


def evaluate(cache: Path, episodes: int, seed: int) -> dict[str, Any]:
    val = load_set(cache, "mini-val")
    train = load_set(cache, "mini-train")
    sets = {"mini-test": load_set(cache, "mini-test"), "cifar-test": load_set(cache, "cifar-test")}
    untaught = [x[15:] for x in train]  # photos of the 64 training classes, never taught and never fitted on
    t0 = time.perf_counter()
    cands, fit_report = fit_candidates(val, np.random.default_rng(seed))
    fit_s = time.perf_counter() - t0
    # ratio test threshold: keeps SHAPE_KEEP of correct answers on validation 5w5s episodes
    from fewshot.artifacts.calibration import SHAPE_KEEP, served_episodes
    from fewshot.decision import DecisionRule, ServedDecision
    e = served_episodes(ServedDecision(DecisionRule("prototype", "cosine"), cands["global (one threshold, 5w5s)"]),
                        val, np.random.default_rng(seed + 1), n_way=5, n_shot=5, n_query=15, n_episodes=300)
    ratio = e.novelty / (1 - e.second)
    ratio_t = float(np.quantile(ratio[e.correct], SHAPE_KEEP))
    results: dict[str, Any] = {}
    for name, way, shot in CHECK_CELLS:
        key = f"{name} {way}w{shot}s"
        r = check_cell(cands, sets, untaught, name, way, shot, episodes, seed)
        rr = r.pop("_ratio")
        keep = rr["nov"] <= ratio_t
        r["ratio test (nearest / second)"] = {"true_accept": float(keep[rr["correct"]].mean()),
                                              "unknown_rejection": float(1 - keep[~rr["known"]].mean())}
        for q, label in ((0.95, "95% quantile"), (1.0, "largest")):
            r[f"self-calibrated: {label} of held-out novelty of stored examples"] = self_calibrated(
                cands["shape, centred cosine"], sets[name], untaught if name == "mini-test" else None, way, shot,
                episodes, seed, q)
        results[key] = r
        print(key, {k: (round(v["true_accept"], 3), round(v["unknown_rejection"], 3)) for k, v in r.items()}, flush=True)
    return {"episodes": episodes, "seed": seed, "fit_s": round(fit_s, 1), "ratio_threshold": ratio_t,
            "rules": {k: v.to_dict() | ({"centre": f"{len(v.centre)} values"} if v.centre else {})
                      for k, v in cands.items()},
            "fit": fit_report, "results": results}


def table(res: dict[str, Any]) -> str:
    cells = list(res["results"])
    names = list(res["results"][cells[0]])
    head = "| rule | " + " | ".join(cells) + " |\n|---|" + "---|" * len(cells) + "\n"
    rows = []
    for n in names:
        vals = []
        for c in cells:
            v = res["results"][c][n]
            vals.append(f"{100 * v['true_accept']:.1f} / {100 * v['unknown_rejection']:.1f}")
        rows.append(f"| {n} | " + " | ".join(vals) + " |")
    return head + "\n".join(rows) + "\n"


def targets(res: dict[str, Any], rule: str = "shape, centred cosine") -> str:
    lines = ["| cell | kept | rejected | |", "|---|---|---|---|"]
    for name, way, shot in CHECK_CELLS:
        if (name, way, shot) not in TARGET_CELLS:
            continue
        v = res["results"][f"{name} {way}w{shot}s"][rule]
        ok = v["true_accept"] >= TARGET_TA and v["unknown_rejection"] >= TARGET_REJ
        lines.append(f"| {name} {way}w{shot}s | {100 * v['true_accept']:.1f} | {100 * v['unknown_rejection']:.1f} | "
                     f"{'met' if ok else '**missed**'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", nargs="+", default=["evaluate"], choices=["embed", "evaluate"])
    p.add_argument("--bundle", type=Path, help="photos bundle folder (section embed)")
    p.add_argument("--data", type=Path, default=Path(os.environ.get("FEWSHOT_DATA", ROOT.parent / "shared/datasets")))
    p.add_argument("--cache", type=Path, default=CACHE)
    p.add_argument("--episodes", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "openset_photos.json")
    args = p.parse_args()
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": sys.version.split()[0],
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    if "embed" in args.sections:
        if args.bundle is None:
            raise SystemExit("--bundle DIR is needed to embed (a photos bundle, e.g. from build_photos_bundle)")
        rep = embed_sets(args.bundle, args.data, args.cache)
        (args.cache / "embed_report.json").write_text(json.dumps({**meta, **rep}, indent=2))
    if "evaluate" in args.sections:
        import torch

        torch.set_num_threads(1)  # small matrices: 2 threads on a loaded 2-core machine were 40x slower
        t0 = time.perf_counter()
        res = evaluate(args.cache, args.episodes, args.seed)
        embed = args.cache / "embed_report.json"
        res = {**meta, "torch": torch.__version__, "wall_s": round(time.perf_counter() - t0, 1),
               "embedding": json.loads(embed.read_text()) if embed.exists() else None, **res}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
        md = "kept / rejected (%), test cells of classes never used to fit:\n\n" + table(res) + "\n" + targets(res)
        args.out.with_suffix(".md").write_text(md)
        print(md)


if __name__ == "__main__":
    main()
