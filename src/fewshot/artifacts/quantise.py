"""int8 bundles: ONNX Runtime static quantisation, calibrated on training images and measured as served.

`quantise_bundle(bundle_dir, calibration_images, evaluate)` adds `model.int8.onnx` to a bundle:

* `onnxruntime.quantization.shape_inference.quant_pre_process`, then `quantize_static` in QDQ
  format (uint8 asymmetric activations, int8 symmetric weights, per output channel by default),
  with activation ranges from `calibration_images` (uint8 (N, C, H, W) under the bundle's
  preprocessing, fed through `model_input` exactly as the embedders feed them).
* `evaluate(embedder) -> {name: accuracy}` is called with the fp32 and the int8 model, both through
  ONNX Runtime (the service's runtime) on the same episodes; a bundle whose int8 model loses more
  than `max_drop` on any of them is refused (`Int8Refused`, nothing written) unless `force`.
* The fp32 `model.onnx` stays in the bundle (its parity check against the weights is unchanged);
  the manifest's `deployment["served_model"]` names `model.int8.onnx`, which `load_bundle` then
  serves (`Bundle.onnx_embedder`), and `deployment["int8"]` records how it was made and both
  accuracies. `bundle_id` becomes the int8 model's hash: its embeddings are not the fp32 ones, so a
  store filled by the fp32 bundle is refused rather than mixed.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy

from fewshot.artifacts.bundle import INT8_TOLERANCE
from fewshot.artifacts.embedders import ONNX_INPUT, Embedder, OnnxEmbedder
from fewshot.artifacts.manifest import (
    INT8_ONNX,
    MANIFEST,
    ONNX,
    PARITY,
    Manifest,
    sha256_file,
    staged_bundle,
)
from fewshot.data.imageio import Preprocessing, model_input
from fewshot.decision import DecisionRule, episode, example_embeddings
from fewshot.errors import CheckpointError, ConfigError

MIN_CALIBRATION_IMAGES = 32
CALIBRATION_BATCH = 16
Method = Literal["minmax", "entropy", "percentile"]


class Int8Refused(CheckpointError):
    """The int8 model loses more accuracy than allowed against the fp32 model."""


class TooFewCalibrationImages(ConfigError):
    """Not enough images to calibrate the activation ranges."""


@dataclass(frozen=True)
class QuantiseConfig:
    """How the int8 model is made and judged.

    per_channel: one weight scale per output channel (better for depthwise convolutions, whose
    channels have very different ranges); method: how activation ranges are read from the
    calibration images; exclude_nodes / exclude_op_types: left in float32; max_drop: largest
    allowed accuracy loss (fraction, 0.01 = 1 point) against the fp32 model on the same episodes;
    min_images: fewest calibration images accepted."""

    per_channel: bool = True
    method: Method = "minmax"
    exclude_nodes: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    max_drop: float = 0.01
    min_images: int = MIN_CALIBRATION_IMAGES

    def __post_init__(self) -> None:
        if self.method not in ("minmax", "entropy", "percentile"):
            raise ConfigError(f"quantisation method {self.method!r} is unknown; use minmax, entropy or percentile")
        if not 0.0 <= self.max_drop < 1.0:
            raise ConfigError(f"max_drop={self.max_drop} must be a fraction in [0, 1), e.g. 0.01 for 1 point")
        if self.min_images < 1:
            raise ConfigError(f"min_images={self.min_images} must be >= 1 (default {MIN_CALIBRATION_IMAGES})")


def check_calibration_images(images_u8: np.ndarray, pre: Preprocessing, *, min_images: int,
                             requested: int | None = None) -> None:
    """Refuse a calibration set of the wrong shape, or smaller than `min_images` or than `requested`."""
    want = (pre.channels, pre.size, pre.size)
    if images_u8.dtype != np.uint8 or images_u8.ndim != 4 or images_u8.shape[1:] != want:
        raise ConfigError(f"int8 calibration images must be uint8 (N, {want[0]}, {want[1]}, {want[2]}) under the "
                          f"bundle's preprocessing; got {images_u8.dtype} {tuple(images_u8.shape)}")
    need = max(min_images, requested or 0)
    if len(images_u8) < need:
        asked = f" (you asked for {requested})" if requested else ""
        raise TooFewCalibrationImages(
            f"int8 calibration has {len(images_u8)} images but needs at least {need}{asked}: activation ranges "
            f"from so few images clip real inputs; give a training split with more images, or ask for "
            f"fewer calibration images (never fewer than {min_images})")


def calibration_sample(by_class: Mapping[str, np.ndarray], n: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (min(n, total), C, H, W): `n` images spread over the classes (round robin over a
    shuffled class order, a random image of each class per round, no image twice)."""
    names = list(by_class)
    orders = {c: rng.permutation(len(by_class[c])) for c in names}
    picked: list[np.ndarray] = []
    total = sum(len(v) for v in by_class.values())
    for round_ in range(max((len(v) for v in by_class.values()), default=0)):
        for c in (names[i] for i in rng.permutation(len(names))):
            if len(picked) >= min(n, total):
                return np.stack(picked)
            if round_ < len(orders[c]):
                picked.append(np.asarray(by_class[c][orders[c][round_]]))
    return np.stack(picked) if picked else np.empty((0,), np.uint8)


def _calibration_reader(images_u8: np.ndarray, pre: Preprocessing) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        """The calibration images as the embedders feed them (`model_input`), in small batches."""

        def __init__(self) -> None:
            self.batches: Iterator[np.ndarray] = (images_u8[i:i + CALIBRATION_BATCH]
                                                  for i in range(0, len(images_u8), CALIBRATION_BATCH))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {ONNX_INPUT: model_input(batch, pre)}

    return Reader()


def quantise_onnx(fp32_path: Path, int8_path: Path, images_u8: np.ndarray, pre: Preprocessing,
                  config: QuantiseConfig) -> dict[str, Any]:
    """Write the static int8 (QDQ) model of `fp32_path` to `int8_path`; returns how it was made."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    with tempfile.TemporaryDirectory(prefix="fewshot-int8-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        try:
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=False)
            quantize_static(
                str(prepared), str(int8_path), _calibration_reader(images_u8, pre), quant_format=QuantFormat.QDQ,
                per_channel=config.per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=methods[config.method], nodes_to_exclude=list(config.exclude_nodes),
                op_types_to_quantize=_op_types(prepared, config.exclude_op_types),
                extra_options={"CalibTensorRangeSymmetric": False},
            )
        except (ValueError, RuntimeError, KeyError) as exc:  # ORT's quantiser raises plain types
            raise CheckpointError(f"{fp32_path}: ONNX Runtime could not quantise the model ({exc}); "
                                  "exclude the failing nodes (QuantiseConfig.exclude_nodes)") from exc
    return {"tool": "onnxruntime.quantization.quantize_static after quant_pre_process", "format": "QDQ",
            "activations": "uint8 asymmetric", "weights": "int8 symmetric", **asdict(config),
            "calibration_images": len(images_u8)}


def _op_types(model_path: Path, excluded: tuple[str, ...]) -> list[str] | None:
    """The op types of the model minus `excluded` (None: the quantiser's default, all it supports)."""
    if not excluded:
        return None
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    return sorted({n.op_type for n in graph.node} - set(excluded))


def accuracy_drops(fp32: Mapping[str, float], int8: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """name -> {"fp32", "int8", "drop"} (drop = fp32 - int8, fractions) for every evaluation."""
    if set(fp32) != set(int8) or not fp32:
        raise CheckpointError(f"evaluate returned different evaluations for fp32 {sorted(fp32)} and int8 "
                              f"{sorted(int8)}; it must measure the same episodes for both models")
    return {k: {"fp32": float(fp32[k]), "int8": float(int8[k]), "drop": float(fp32[k]) - float(int8[k])}
            for k in fp32}


def check_drop(accuracy: Mapping[str, Mapping[str, float]], max_drop: float, n_images: int) -> None:
    """Raise `Int8Refused` when the int8 model loses more than `max_drop` on some evaluation."""
    worst = max(accuracy, key=lambda k: accuracy[k]["drop"])
    a = accuracy[worst]
    if a["drop"] > max_drop:
        raise Int8Refused(
            f"the int8 model scores {100 * a['int8']:.2f}% on {worst} against {100 * a['fp32']:.2f}% for fp32 "
            f"(same episodes, ONNX Runtime + the bundle's rule): {100 * a['drop']:.2f} points lost, more than the "
            f"{100 * max_drop:.2f} allowed; nothing was written. Calibrate on more training images (now "
            f"{n_images}), or pass --force to write it anyway (the manifest records both accuracies)")


def _int8_parity(tmp: Path, int8: OnnxEmbedder, fp32: OnnxEmbedder) -> dict[str, Any]:
    """Add the int8 embeddings of the stored parity images to parity.safetensors; returns how
    far the int8 embeddings are from the fp32 ones (relative L2 per image)."""
    stored = load_numpy(str(tmp / PARITY))
    ref = int8.embed(stored["images"])
    f = fp32.embed(stored["images"])
    rel = np.linalg.norm(ref - f, axis=1) / np.maximum(np.linalg.norm(f, axis=1), 1e-12)
    save_numpy({**stored, "embeddings_int8": ref}, str(tmp / PARITY))
    return {"int8_tolerance": INT8_TOLERANCE, "int8_vs_fp32_relative_l2_max": float(rel.max()),
            "int8_vs_fp32_relative_l2_mean": float(rel.mean())}


def quantise_bundle(
    bundle_dir: str | Path, calibration_images: np.ndarray,
    evaluate: Callable[[Embedder], Mapping[str, float]], *, out_dir: str | Path,
    config: QuantiseConfig = QuantiseConfig(), force: bool = False, requested: int | None = None,
    calibrated_on: str = "training images", recalibrate: Callable[[Embedder], dict[str, Any] | None] | None = None,
) -> Path:
    """Write `out_dir`: the bundle at `bundle_dir` plus its int8 model, served (see module doc).

    calibration_images: uint8 (N, C, H, W) training images under the bundle's preprocessing.
    evaluate: embedder -> {evaluation name: accuracy in [0, 1]} on fixed episodes (called twice).
    requested: how many calibration images the user asked for (fewer given -> error).
    recalibrate: int8 embedder -> the open-set calibration (`Calibration.to_dict()`) redone on the
    int8 embeddings; None keeps the fp32 calibration (recorded in the manifest).
    """
    src, out = Path(bundle_dir), Path(out_dir)
    if out.exists():
        raise CheckpointError(f"{out} already exists; choose a new bundle folder or delete it")
    manifest = Manifest.read(src)
    if INT8_ONNX in manifest.sha256:
        raise CheckpointError(f"{src} already holds an int8 model; quantise the fp32 bundle it came from")
    pre = Preprocessing.from_dict(manifest.preprocessing)
    check_calibration_images(calibration_images, pre, min_images=config.min_images, requested=requested)
    with staged_bundle(out) as tmp:
        for f in src.iterdir():
            shutil.copy2(f, tmp / f.name)
        made = quantise_onnx(tmp / ONNX, tmp / INT8_ONNX, calibration_images, pre, config)
        _write_int8_manifest(tmp, manifest, pre, evaluate, made, config=config, force=force,
                             calibrated_on=calibrated_on, recalibrate=recalibrate)
    return out


def _write_int8_manifest(tmp: Path, manifest: Manifest, pre: Preprocessing,
                         evaluate: Callable[[Embedder], Mapping[str, float]], made: dict[str, Any], *,
                         config: QuantiseConfig, force: bool, calibrated_on: str,
                         recalibrate: Callable[[Embedder], dict[str, Any] | None] | None) -> None:
    """Measure both models, refuse or record, and write the int8 bundle's manifest into `tmp`."""
    fp32 = OnnxEmbedder(tmp / ONNX, pre, embedding_dim=manifest.embedding_dim)
    int8 = OnnxEmbedder(tmp / INT8_ONNX, pre, embedding_dim=manifest.embedding_dim)
    accuracy = accuracy_drops(evaluate(fp32), evaluate(int8))
    if not force:
        check_drop(accuracy, config.max_drop, made["calibration_images"])
    parity = {**manifest.parity, **_int8_parity(tmp, int8, fp32)}
    calibration = manifest.calibration
    cal_note = "open-set rules calibrated on the fp32 embeddings" if calibration else "no open-set calibration"
    if recalibrate is not None and calibration is not None:
        calibration, cal_note = recalibrate(int8), "open-set rules re-calibrated on the int8 embeddings"
    hashes = {**manifest.sha256, INT8_ONNX: sha256_file(tmp / INT8_ONNX), PARITY: sha256_file(tmp / PARITY)}
    int8_record = {**made, "calibrated_on": calibrated_on, "accuracy": accuracy, "forced": force,
                   "fp32_bundle_id": manifest.bundle_id, "calibration": cal_note,
                   "domain_summary": "from the fp32 embeddings" if manifest.domain else "none"}
    deployment = {**(manifest.deployment or {}), "served_model": INT8_ONNX, "int8": int8_record,
                  "models": f"{ONNX}: fp32, parity-checked against the weights; {INT8_ONNX}: int8, served"}
    new = replace(manifest, bundle_id=hashes[INT8_ONNX][:16], sha256=hashes, parity=parity,
                  calibration=calibration, deployment=deployment, decision=None)  # re-derived: the new rules
    (tmp / MANIFEST).write_text(new.to_json())


def episode_evaluator(images_by_class: Mapping[str, np.ndarray], rule: DecisionRule, *, way: int, shot: int,
                      query: int, episodes: int, seed: int, name: str | None = None,
                      ) -> Callable[[Embedder], dict[str, float]]:
    """`evaluate` for `quantise_bundle` on fixed episodes of labelled images: embedder -> {name:
    mean accuracy}. Each image is embedded once (embeddings do not depend on the batch: the
    bundle's parity check holds batch 1 and 16 to the same output), then every episode's queries
    are answered over its support set (through the rule's example views) by `rule`, as the service
    answers them (`fewshot.decision`)."""
    classes = sorted(images_by_class)
    short = [c for c in classes if len(images_by_class[c]) < shot + query]
    if len(classes) < way or short:
        raise ConfigError(f"{way}-way {shot}-shot {query}-query episodes need {way} classes of >= {shot + query} "
                          f"images; got {len(classes)} classes, too small: {short[:5]}")
    rng = np.random.default_rng(seed)
    plan = []
    for _ in range(episodes):
        picked = rng.choice(len(classes), size=way, replace=False)
        plan.append([(classes[c], rng.choice(len(images_by_class[classes[c]]), size=shot + query, replace=False))
                     for c in picked])
    key = name or f"{way}w{shot}s{query}q_{episodes}ep_seed{seed}"

    def evaluate(embedder: Embedder) -> dict[str, float]:
        emb = {c: _embed_all(embedder.embed, images_by_class[c]) for c in classes}
        taught = emb if rule.views == "none" else {  # the rule's example views (fewshot.decision.views)
            c: _embed_all(lambda x: example_embeddings(embedder.embed, x, rule.views, rule.view_shift), images_by_class[c])
            for c in classes}
        accs = []
        ys, yq = np.repeat(np.arange(way), shot), np.repeat(np.arange(way), query)
        for ep in plan:
            zs = np.concatenate([taught[c][i[:shot]] for c, i in ep])
            zq = np.concatenate([emb[c][i[shot:]] for c, i in ep])
            accs.append(float((episode(rule, zs, ys, way, zq).label == yq).mean()))
        return {key: float(np.mean(accs))}

    return evaluate


def _embed_all(embed: Callable[[np.ndarray], np.ndarray], images_u8: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([embed(images_u8[i:i + batch]) for i in range(0, len(images_u8), batch)])
