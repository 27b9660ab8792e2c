"""Bring your own ONNX feature extractor: any ONNX model mapping images (N, C, S, S) float32 to
embeddings (N, D) becomes a bundle the service loads (`fewshot bundle-onnx`).

`bundle_from_onnx` checks the model before writing anything:

* with `onnx`: one float32 input of rank 4 whose channel count matches the mode (1 for "L", 3 for
  "RGB") and whose spatial sides are `size` or dynamic, with a dynamic batch; one float32 output
  of rank 2 with a fixed embedding size D;
* with ONNX Runtime, on sample images decoded under the preprocessing: the output is (N, D),
  finite, not the same for every image, and the same for an image alone as in a batch.

The bundle holds the model with its input and output renamed to the bundle's `images` /
`embeddings`, reference embeddings of the samples (re-checked on load) and, when a labelled folder
(one subfolder of images per class) is given, the open-set rules (`calibrate_open_set`); without
one the manifest says that unknown images are not rejected. There are no PyTorch weights: the
bundle is served by ONNX Runtime only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file as save_numpy

from fewshot.artifacts.bundle import PARITY_SAMPLES
from fewshot.artifacts.calibration import calibrate_open_set
from fewshot.artifacts.embedders import ONNX_INPUT, ONNX_OUTPUT, OnnxEmbedder
from fewshot.artifacts.manifest import (
    BUNDLE_FORMAT_VERSION,
    MANIFEST,
    ONNX,
    ONNX_ONLY_BACKBONE,
    PARITY,
    Manifest,
    library_versions,
    sha256_file,
    staged_bundle,
)
from fewshot.data.imageio import Preprocessing, decode_image
from fewshot.decision import DecisionRule, Metric
from fewshot.errors import CheckpointError, DataError

BATCH_TOLERANCE = 1e-4  # relative: an image alone and in a batch must embed alike
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"})


class OnnxModelError(CheckpointError):
    """The ONNX model is not an image -> embedding model the bundle can serve."""


@dataclass(frozen=True)
class Signature:
    """The model's input and output names and its embedding size."""

    input_name: str
    output_name: str
    embedding_dim: int


def _dims(value_info: Any) -> list[int | str]:
    """Each dimension as an int, or its symbolic name / "?" when dynamic."""
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value_info.type.tensor_type.shape.dim]


def _float32(value_info: Any, what: str) -> None:
    import onnx

    elem = value_info.type.tensor_type.elem_type
    if elem != onnx.TensorProto.FLOAT:
        raise OnnxModelError(f"model {what} {value_info.name!r} is {onnx.TensorProto.DataType.Name(elem)}; the "
                             "bundle feeds and reads float32: export the model in float32")


def check_input(value_info: Any, pre: Preprocessing) -> None:
    """Rank 4, dynamic batch, channels of the mode, spatial sides `pre.size` or dynamic."""
    _float32(value_info, "input")
    dims, name = _dims(value_info), value_info.name
    if len(dims) != 4:
        raise OnnxModelError(f"model input {name!r} has shape {tuple(dims)} (rank {len(dims)}); a bundle feeds images "
                             f"(N, C, {pre.size}, {pre.size}): export the model with an image input of rank 4")
    if isinstance(dims[0], int):
        raise OnnxModelError(f"model input {name!r} has shape {tuple(dims)}: the batch is fixed at {dims[0]}; the "
                             "service embeds batches of any size: export with a dynamic first axis")
    if isinstance(dims[1], int) and dims[1] != pre.channels:
        raise OnnxModelError(f"model input {name!r} has shape {tuple(dims)}: {dims[1]} channel(s), but mode "
                             f"{pre.mode!r} gives {pre.channels}; pass --mode {'L' if dims[1] == 1 else 'RGB'} if the "
                             f"model takes {dims[1]} channel(s)")
    if any(isinstance(d, int) and d != pre.size for d in dims[2:]):
        raise OnnxModelError(f"model input {name!r} has shape {tuple(dims)}: its spatial size is fixed and is not "
                             f"{pre.size}x{pre.size}; pass --size {dims[2]}")


def check_output(value_info: Any) -> int:
    """Rank 2 with a fixed D; returns D."""
    _float32(value_info, "output")
    dims, name = _dims(value_info), value_info.name
    if len(dims) != 2:
        raise OnnxModelError(f"model output {name!r} has shape {tuple(dims)} (rank {len(dims)}); a bundle needs "
                             "embeddings (N, D): pool and flatten the features before exporting")
    if not isinstance(dims[1], int) or dims[1] < 1:
        raise OnnxModelError(f"model output {name!r} has shape {tuple(dims)}: the embedding size D is not fixed; "
                             "export the model with a fixed output width")
    return dims[1]


def inspect_onnx(model: Any, pre: Preprocessing) -> Signature:
    """The model's signature, checked against `pre` (see module doc)."""
    graph = model.graph
    init = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in init]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise OnnxModelError(f"model has inputs {[i.name for i in inputs]} and outputs {[o.name for o in graph.output]};"
                             " a bundle needs exactly one image input and one embedding output")
    check_input(inputs[0], pre)
    return Signature(inputs[0].name, graph.output[0].name, check_output(graph.output[0]))


def canonical(model: Any, sig: Signature) -> Any:
    """A copy of `model` whose input / output are named `images` / `embeddings` (what the bundle's
    embedder feeds and reads)."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    names = {sig.input_name: ONNX_INPUT, sig.output_name: ONNX_OUTPUT}
    for node in m.graph.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]
    for v in (*m.graph.input, *m.graph.output, *m.graph.value_info):
        v.name = names.get(v.name, v.name)
    return m


def self_check(embedder: OnnxEmbedder, samples: np.ndarray) -> dict[str, Any]:
    """Finite, not constant, and batch-size independent embeddings of `samples` (>= 2 images)."""
    batch = embedder.embed(samples)
    if batch.shape != (len(samples), embedder.embedding_dim):
        raise OnnxModelError(f"ONNX Runtime returned {batch.shape} for {len(samples)} images; expected "
                             f"({len(samples)}, {embedder.embedding_dim}): the output must be (N, D)")
    if not np.isfinite(batch).all():
        raise OnnxModelError(f"the model returned non-finite embeddings for {int((~np.isfinite(batch)).any(1).sum())} "
                             "of the sample images; check --mean/--std and that the model is float32-exportable")
    scale = float(np.abs(batch).max())
    spread = float(batch.std(axis=0).max())
    if spread <= 1e-6 * max(scale, 1e-12):
        raise OnnxModelError(f"the model gives the same embedding to all {len(samples)} sample images (largest "
                             f"per-dimension spread {spread:.3g}); check the preprocessing (--mean/--std, --mode, "
                             "--size) and that the samples differ")
    alone = np.concatenate([embedder.embed(samples[i:i + 1]) for i in range(len(samples))])
    diff = float(np.abs(alone - batch).max()) / max(scale, 1e-12)
    if diff > BATCH_TOLERANCE:
        raise OnnxModelError(f"an image embeds differently alone and in a batch of {len(samples)} (relative "
                             f"difference {diff:.3g}); the model mixes images of a batch (batch norm in training "
                             "mode?): export it in eval mode")
    return {"samples": len(samples), "batch_sizes": [1, len(samples)], "batch_relative_diff": diff,
            "embedding_spread": spread}


def read_folder(folder: Path, pre: Preprocessing, *, labelled: bool) -> dict[str, np.ndarray]:
    """Images of `folder` decoded under `pre`: class subfolder -> uint8 (n, C, S, S) when
    `labelled`, else {"": all images directly in the folder}."""
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; give a folder of images"
                        + (" with one subfolder per class" if labelled else ""))
    groups = sorted(d for d in folder.iterdir() if d.is_dir()) if labelled else [folder]
    out: dict[str, np.ndarray] = {}
    for g in groups:
        files = sorted(f for f in g.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            out["" if not labelled else g.name] = np.stack([decode_image(f.read_bytes(), pre, name=str(f))
                                                            for f in files])
    if not out:
        raise DataError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
                        + (" in class subfolders" if labelled else ""))
    return out


def synthetic_samples(n: int, pre: Preprocessing, rng: np.random.Generator) -> np.ndarray:
    """uint8 (n, C, S, S) smooth random colour fields: used for the self-check when no samples are given."""
    low = rng.random((n, pre.channels, 4, 4))
    idx = np.arange(pre.size) * 4 // pre.size
    return (low[:, :, idx][:, :, :, idx] * 255).round().astype(np.uint8)


def _open_set(embedder: OnnxEmbedder, by_class: Mapping[str, np.ndarray], rng: np.random.Generator,
              episodes: int) -> dict[str, Any]:
    smallest = min(len(v) for v in by_class.values())
    if len(by_class) < 3 or smallest < 2:
        raise DataError(f"open-set calibration needs >= 3 classes of >= 2 images; the labelled folder has "
                        f"{len(by_class)} classes, the smallest with {smallest} image(s): add classes or images")
    n_shot = max(1, min(5, smallest - 1))
    return calibrate_open_set(embedder, by_class, rng, n_way=min(5, len(by_class) - 1), n_shot=n_shot,
                              n_query=max(1, min(15, smallest - n_shot)), n_episodes=episodes).to_dict()


def bundle_from_onnx(
    model_path: str | Path, out_dir: str | Path, *, preprocessing: Preprocessing,
    samples: np.ndarray | None = None, labelled: Mapping[str, np.ndarray] | None = None,
    metric: Metric = "cosine", calibration_episodes: int = 200, seed: int = 0,
) -> Path:
    """Check `model_path` and write it as a bundle at `out_dir` (see module doc).

    samples: uint8 (N >= 2, C, S, S) images under `preprocessing` for the self-check (default: the
    labelled images, else synthetic ones). labelled: class -> uint8 images for the open-set
    calibration (None: no calibration). metric: the nearest-prototype metric the service uses.
    """
    import onnx

    src = Path(model_path)
    try:
        model = onnx.load(str(src))
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises several types for unreadable or invalid files
        raise OnnxModelError(f"{src}: not a valid ONNX model ({exc}); export it with torch.onnx.export") from exc
    sig = inspect_onnx(model, preprocessing)
    rng = np.random.default_rng(seed)
    if samples is None:
        samples = (np.concatenate([v[:4] for v in labelled.values()])[:PARITY_SAMPLES] if labelled
                   else synthetic_samples(8, preprocessing, rng))
    with staged_bundle(Path(out_dir)) as tmp:
        onnx.save(canonical(model, sig), str(tmp / ONNX))
        embedder = OnnxEmbedder(tmp / ONNX, preprocessing, embedding_dim=sig.embedding_dim)
        checked = self_check(embedder, samples)
        stored = np.ascontiguousarray(samples[:PARITY_SAMPLES])
        ref = embedder.embed(stored)
        save_numpy({"images": stored, "embeddings": ref}, str(tmp / PARITY))
        calibration = None if labelled is None else _open_set(embedder, labelled, rng, calibration_episodes)
        _write_manifest(tmp, src, sig, preprocessing, metric, checked, float(np.abs(ref).max()), calibration,
                        labelled)
    return Path(out_dir)


def _write_manifest(tmp: Path, src: Path, sig: Signature, pre: Preprocessing, metric: Metric,
                    checked: dict[str, Any], scale: float, calibration: dict[str, Any] | None,
                    labelled: Mapping[str, np.ndarray] | None) -> None:
    hashes = {name: sha256_file(tmp / name) for name in (ONNX, PARITY)}
    source_sha = sha256_file(src)
    deployment: dict[str, Any] = {"embedder": "onnx", "rule": DecisionRule("prototype", metric).to_dict()}
    deployment["open_set"] = ("not calibrated: no labelled folder was given; unknown images are not rejected"
                              if labelled is None else
                              f"calibrated on a labelled folder of {len(labelled)} classes, "
                              f"{sum(len(v) for v in labelled.values())} images")
    manifest = Manifest(
        format_version=BUNDLE_FORMAT_VERSION, bundle_id=hashes[ONNX][:16],
        backbone={"name": ONNX_ONLY_BACKBONE, "file": src.name, "sha256": source_sha, "input": sig.input_name,
                  "output": sig.output_name},
        preprocessing=pre.to_dict(), embedding_dim=sig.embedding_dim,
        source={"name": src.stem, "model": f"user-supplied ONNX model {src.name}", "trained_here": False},
        data_fingerprint=hashlib.sha256(f"{source_sha} {pre.to_dict()}".encode()).hexdigest(), metrics={},
        calibration=calibration, versions=library_versions(), sha256=hashes,
        parity={"self_check": checked, "tolerance": BATCH_TOLERANCE * max(scale, 1.0), "max_abs_diff": 0.0},
        deployment=deployment,
    )
    (tmp / MANIFEST).write_text(manifest.to_json())


__all__ = ["OnnxModelError", "Signature", "bundle_from_onnx", "inspect_onnx", "read_folder"]
