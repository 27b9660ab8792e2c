"""Self-describing model bundle: `weights.safetensors` + `model.onnx` + `parity.safetensors` +
`manifest.json` (the folder's layout and `Manifest` are `fewshot.artifacts.manifest`, whose names
are importable from here too). Nothing in it needs pickle to load.

`export_bundle` writes into a temporary sibling directory and renames it into place only after
ONNX Runtime and PyTorch agree on real images, so a refused export leaves nothing at `out_dir`.
`load_bundle` verifies the sha256 of every file and re-runs the parity check on the stored sample
images, so a bundle whose ONNX graph and weights disagree is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch

from fewshot.artifacts.calibration import Calibration
from fewshot.artifacts.domain import DomainSummary
from fewshot.artifacts.embedders import OnnxEmbedder, TorchEmbedder
from fewshot.artifacts.manifest import (
    BUNDLE_FORMAT_VERSION,
    INT8_ONNX,
    MANIFEST,
    ONNX,
    ONNX_ONLY_BACKBONE,
    PARITY,
    WEIGHTS,
    Manifest,
    library_versions,
    onnx_only,
    served_model,
    sha256_file,
    staged_bundle,
)
from fewshot.artifacts.onnx_export import (
    PARITY_TOLERANCE,
    ParityError,
    check_parity,
    expected_outputs,
    export_onnx,
    parity_batches,
)
from fewshot.backbones import backbone_from_config
from fewshot.backbones.base import Backbone
from fewshot.data.imageio import Preprocessing
from fewshot.decision import BundleDecision, DecisionRule
from fewshot.errors import CheckpointError

__all__ = [
    "BUNDLE_FORMAT_VERSION", "INT8_ONNX", "INT8_TOLERANCE", "MANIFEST", "ONNX", "ONNX_ONLY_BACKBONE", "PARITY",
    "PARITY_SAMPLES", "WEIGHTS", "Bundle", "Manifest", "export_bundle", "library_versions", "load_bundle",
    "onnx_only", "served_model", "sha256_file", "staged_bundle",
]

PARITY_SAMPLES = 16
# int8 kernels differ between CPUs (VNNI or not): a loaded int8 model must reproduce the embeddings
# recorded at export within this relative L2 distance per image
INT8_TOLERANCE = 0.02


def _check_inputs(backbone: Backbone, pre: Preprocessing, sample_images: np.ndarray) -> None:
    cfg = getattr(backbone, "config", None)
    if not isinstance(cfg, dict) or "name" not in cfg or not hasattr(backbone, "embedding_dim"):
        raise CheckpointError(
            f"{type(backbone).__name__} has no `config` dict with a 'name' or no `embedding_dim`; "
            "build it with fewshot.backbones.create_backbone"
        )
    want = (pre.channels, pre.size, pre.size)
    if sample_images.dtype != np.uint8 or sample_images.ndim != 4 or sample_images.shape[1:] != want:
        raise CheckpointError(
            f"sample_images must be uint8 (N, {want[0]}, {want[1]}, {want[2]}) decoded with the "
            f"bundle's preprocessing; got {sample_images.dtype} {tuple(sample_images.shape)}"
        )


def _check_domain(domain: dict[str, Any], pre: Preprocessing, embedding_dim: int) -> None:
    d = DomainSummary.from_dict(domain)
    if (d.mode, d.size, d.embedding.dim) != (pre.mode, pre.size, embedding_dim):
        raise CheckpointError(
            f"domain summary is of mode {d.mode!r}, size {d.size}, {d.embedding.dim}-d embeddings but the "
            f"bundle is {pre.mode!r}, {pre.size}, {embedding_dim}-d; build it with this model and preprocessing"
        )


def _write_files(
    tmp: Path, backbone: Backbone, pre: Preprocessing, sample_images: np.ndarray, tolerance: float
) -> dict[str, Any]:
    """Weights, ONNX, parity sample into `tmp`; returns the parity record. Raises ParityError."""
    state = {k: v.detach().contiguous().clone() for k, v in backbone.state_dict().items()}
    save_torch(state, str(tmp / WEIGHTS))
    export_onnx(backbone, tmp / ONNX, channels=pre.channels, size=pre.size)
    emb = backbone.embedding_dim
    torch_e = TorchEmbedder(backbone, pre)
    onnx_e = OnnxEmbedder(tmp / ONNX, pre, embedding_dim=emb)
    diff = check_parity(torch_e, onnx_e, sample_images, tolerance=tolerance)
    sample = np.ascontiguousarray(sample_images[:PARITY_SAMPLES])
    save_numpy({"images": sample, "embeddings": expected_outputs(torch_e, sample)}, str(tmp / PARITY))
    sizes = [len(b) for b in parity_batches(sample_images)]
    return {"max_abs_diff": diff, "tolerance": tolerance, "batch_sizes": sizes}


def export_bundle(
    backbone: Backbone, out_dir: str | Path, *, preprocessing: Preprocessing, source: dict[str, Any],
    metrics: dict[str, Any], data_fingerprint: str, calibration: dict[str, Any] | None,
    sample_images: np.ndarray, tolerance: float = PARITY_TOLERANCE,
    deployment: dict[str, Any] | None = None,
    evaluate: Callable[[OnnxEmbedder], dict[str, Any]] | None = None,
    domain: dict[str, Any] | None = None,
) -> Path:
    """Write the bundle atomically; refuse it (nothing at `out_dir`) if ONNX and PyTorch disagree,
    or if `evaluate` (called with the written ONNX model as the service will run it) raises.

    sample_images: uint8 (N, C, H, W) real images under `preprocessing`, for the parity check.
    evaluate: -> metrics of the bundle as served, merged into the manifest's `metrics`.
    domain: `DomainSummary.to_dict()` of the training images (fewshot.artifacts.domain), checked
    against `preprocessing` and the embedding size.
    """
    out = Path(out_dir)
    if out.exists():
        raise CheckpointError(f"{out} already exists; choose a new bundle directory or delete it first")
    _check_inputs(backbone, preprocessing, sample_images)
    if calibration is not None:
        Calibration.from_dict(calibration)  # validate before writing anything
    if domain is not None:
        _check_domain(domain, preprocessing, backbone.embedding_dim)
    backbone = backbone.eval()
    with staged_bundle(out) as tmp:
        parity = _write_files(tmp, backbone, preprocessing, sample_images, tolerance)
        hashes = {name: sha256_file(tmp / name) for name in (WEIGHTS, ONNX, PARITY)}
        if evaluate is not None:
            emb = OnnxEmbedder(tmp / ONNX, preprocessing,
                               embedding_dim=backbone.embedding_dim)
            metrics = {**metrics, **evaluate(emb)}
        manifest = Manifest(
            format_version=BUNDLE_FORMAT_VERSION, bundle_id=hashes[WEIGHTS][:16],
            backbone=dict(backbone.config), preprocessing=preprocessing.to_dict(),
            embedding_dim=backbone.embedding_dim, source=source,
            data_fingerprint=data_fingerprint, metrics=metrics, calibration=calibration,
            versions=library_versions(), sha256=hashes, parity=parity, deployment=deployment, domain=domain,
        )
        (tmp / MANIFEST).write_text(manifest.to_json())
    return out


@dataclass
class Bundle:
    """A loaded, verified bundle. `onnx_embedder` is what the service uses (the served model:
    `model.int8.onnx` in an int8 bundle, else `model.onnx`); `torch_embedder` is built on first use
    (eager PyTorch, for comparison and fine-tuning)."""

    path: Path
    manifest: Manifest
    onnx_embedder: OnnxEmbedder
    _backbone: Backbone | None  # None: an ONNX-only bundle (fewshot.artifacts.byo)

    @property
    def bundle_id(self) -> str:
        return self.manifest.bundle_id

    @property
    def embedding_dim(self) -> int:
        return self.manifest.embedding_dim

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.manifest.preprocessing)

    @property
    def calibration(self) -> Calibration | None:
        c = self.manifest.calibration
        return None if c is None else Calibration.from_dict(c)

    @cached_property
    def domain(self) -> DomainSummary | None:
        """The training domain, to flag far-out uploads (None for bundles exported without one);
        parsed once."""
        d = self.manifest.domain
        return None if d is None else DomainSummary.from_dict(d)

    @property
    def served_model(self) -> str:
        """The ONNX file the service runs: model.onnx, or model.int8.onnx for an int8 bundle."""
        return served_model(self.manifest)

    @property
    def onnx_path(self) -> Path:
        return self.path / self.served_model

    @cached_property
    def decision(self) -> BundleDecision:
        """The served decision: head and open-set rules (`Manifest.decision`)."""
        return BundleDecision.from_dict(self.manifest.decision or {})

    @property
    def decision_rule(self) -> DecisionRule:
        """The head the bundle was measured with (older bundles: nearest prototype, Euclidean)."""
        return self.decision.rule

    @property
    def backbone(self) -> Backbone:
        """The PyTorch backbone; refused for an ONNX-only bundle."""
        if self._backbone is None:
            raise CheckpointError(f"{self.path} was made from an ONNX model ({self.manifest.backbone.get('file')}) and "
                                  "has no PyTorch weights; use its onnx_embedder")
        return self._backbone

    @cached_property
    def torch_embedder(self) -> TorchEmbedder:
        return TorchEmbedder(self.backbone, self.preprocessing)


def _verify_hashes(root: Path, manifest: Manifest) -> None:
    required = (ONNX, PARITY) if onnx_only(manifest) else (WEIGHTS, ONNX, PARITY)
    for name in dict.fromkeys((*required, *manifest.sha256)):
        f = root / name
        if not f.is_file():
            raise CheckpointError(f"{root}: bundle file {name} is missing; re-export the bundle")
        actual = sha256_file(f)
        if actual != manifest.sha256.get(name):
            raise CheckpointError(
                f"{f}: sha256 {actual[:16]}... does not match the manifest "
                f"({str(manifest.sha256.get(name))[:16]}...); the file was modified or corrupted; "
                "re-export the bundle"
            )


def _load_backbone(root: Path, manifest: Manifest) -> Backbone:
    backbone = backbone_from_config(manifest.backbone)
    state = load_torch(str(root / WEIGHTS))
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{root}: weights do not fit backbone {manifest.backbone} ({exc})") from exc
    return backbone.eval()


def load_bundle(path: str | Path, *, intra_op_threads: int | None = None, verify_parity: bool = True) -> Bundle:
    """Load and verify a bundle (hashes, then ONNX-vs-weights parity on the stored samples)."""
    root = Path(path)
    manifest = Manifest.read(root)
    _verify_hashes(root, manifest)
    backbone = None if onnx_only(manifest) else _load_backbone(root, manifest)
    pre = Preprocessing.from_dict(manifest.preprocessing)
    onnx_e = OnnxEmbedder(root / served_model(manifest), pre,
                          embedding_dim=manifest.embedding_dim, intra_op_threads=intra_op_threads)
    bundle = Bundle(path=root, manifest=manifest, onnx_embedder=onnx_e, _backbone=backbone)
    if verify_parity:
        _verify_parity(root, bundle, manifest)
    return bundle


def _fp32_embedder(bundle: Bundle) -> OnnxEmbedder:
    if bundle.served_model == ONNX:
        return bundle.onnx_embedder
    return OnnxEmbedder(bundle.path / ONNX, bundle.preprocessing, embedding_dim=bundle.embedding_dim)


def _verify_int8(root: Path, bundle: Bundle, sample: dict[str, np.ndarray]) -> None:
    """The served int8 model reproduces the int8 embeddings recorded when it was made."""
    ref = sample.get("embeddings_int8")
    if ref is None:
        raise ParityError(f"{root}: parity.safetensors has no int8 embeddings for {INT8_ONNX}; re-quantise the bundle")
    got = bundle.onnx_embedder.embed(sample["images"])
    tol = float(bundle.manifest.parity.get("int8_tolerance", INT8_TOLERANCE))
    rel = float((np.linalg.norm(got - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-12)).max())
    if not np.isfinite(rel) or rel > tol:
        raise ParityError(
            f"{root}: {INT8_ONNX} embeddings differ from those recorded when it was made by {rel:.3g} (relative L2, "
            f"tolerance {tol:g}); this CPU's int8 kernels disagree or the bundle changed: re-quantise the bundle here"
        )


def _verify_parity(root: Path, bundle: Bundle, manifest: Manifest) -> None:
    sample = load_numpy(str(root / PARITY))
    tol = float(manifest.parity.get("tolerance", PARITY_TOLERANCE))
    fp32 = _fp32_embedder(bundle)
    try:
        if not onnx_only(manifest):
            check_parity(bundle.torch_embedder, fp32, sample["images"], tolerance=tol)
    except ParityError as exc:
        raise ParityError(f"{root}: model.onnx and weights.safetensors disagree: {exc}") from exc
    if bundle.served_model == INT8_ONNX:
        _verify_int8(root, bundle, sample)
    ref = float(np.abs(fp32.embed(sample["images"]) - sample["embeddings"]).max())
    if ref > tol:
        raise ParityError(
            f"{root}: embeddings differ from those recorded at export by {ref:.3g} (tolerance {tol:g}); "
            "the bundle was changed after export; re-export it"
        )
