"""What a bundle folder holds: its file names, `manifest.json` (`Manifest`), the sha256 of each
file, and the staged folder a bundle is written into so that a refused one leaves nothing behind."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import fewshot
from fewshot.decision import BundleDecision
from fewshot.errors import CheckpointError, ConfigError

WEIGHTS, ONNX, PARITY, MANIFEST = "weights.safetensors", "model.onnx", "parity.safetensors", "manifest.json"
BUNDLE_FORMAT_VERSION = 1
ONNX_ONLY_BACKBONE = "onnx"  # backbone name of a bundle made from a user's ONNX model (no weights file)
INT8_ONNX = "model.int8.onnx"  # written by fewshot.artifacts.quantise; served when deployment["served_model"] names it


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"fewshot": fewshot.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


@dataclass(frozen=True)
class Manifest:
    """Everything needed to rebuild, check and describe the model; `manifest.json` on disk."""

    format_version: int
    bundle_id: str
    backbone: dict[str, Any]
    preprocessing: dict[str, Any]
    embedding_dim: int
    source: dict[str, Any]
    data_fingerprint: str
    metrics: dict[str, Any]
    calibration: dict[str, Any] | None
    versions: dict[str, str]
    sha256: dict[str, str]
    parity: dict[str, Any]
    created_unix: float = field(default_factory=time.time)
    # how the bundle is served: {"embedder": ..., "rule": DecisionRule.to_dict(), ...}
    deployment: dict[str, Any] | None = None
    # the training domain (DomainSummary.to_dict()); None in bundles exported before it existed
    domain: dict[str, Any] | None = None
    # the served decision (`BundleDecision.to_dict()`: head + open-set rule per metric). Given None
    # (every manifest written before it existed, and writers that pass `deployment["rule"]` and a
    # calibration), it is derived from those (`BundleDecision.from_legacy`); given, it must agree.
    decision: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        try:
            derived = BundleDecision.from_legacy(self.deployment, self.calibration)
            stored = None if self.decision is None else BundleDecision.from_dict(self.decision)
        except ConfigError as exc:
            raise CheckpointError(f"bundle {self.bundle_id}: its decision cannot be read ({exc}); re-export it") from exc
        legacy = "rule" in (self.deployment or {}) or bool((self.calibration or {}).get("rules"))
        if stored is not None and legacy and stored != derived:
            raise CheckpointError(f"bundle {self.bundle_id}: manifest decision {self.decision} disagrees with its "
                                  "deployment rule / calibration rules; re-export the bundle")
        object.__setattr__(self, "decision", (stored or derived).to_dict())

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True)

    @classmethod
    def read(cls, bundle_dir: str | Path) -> Manifest:
        """The manifest of a bundle folder, without loading or verifying the model (see load_bundle)."""
        root = Path(bundle_dir)
        if not (root / MANIFEST).is_file():
            raise CheckpointError(f"{root} is not a bundle (no {MANIFEST}); pass the directory export_bundle wrote")
        return cls.from_json((root / MANIFEST).read_text(), where=str(root))

    @classmethod
    def from_json(cls, text: str, *, where: str) -> Manifest:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{where}: manifest.json is not valid JSON ({exc}); re-export the bundle") from exc
        version = d.get("format_version") if isinstance(d, dict) else None
        if version != BUNDLE_FORMAT_VERSION:
            raise CheckpointError(
                f"{where}: bundle format_version {version!r} is not supported (this fewshot reads "
                f"{BUNDLE_FORMAT_VERSION}); re-export the bundle with this version"
            )
        try:
            return cls(**d)
        except TypeError as exc:
            raise CheckpointError(f"{where}: manifest.json has missing or unknown fields ({exc})") from exc


@contextmanager
def staged_bundle(out: Path) -> Iterator[Path]:
    """A temporary sibling folder of `out` to write a bundle into: renamed to `out` (files 0644)
    when the block succeeds, removed when it raises, so a refused bundle leaves nothing at `out`."""
    if out.exists():
        raise CheckpointError(f"{out} already exists; choose a new bundle directory or delete it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes 0700; a bundle is meant to be read by the service user
        yield tmp
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def served_model(manifest: Manifest) -> str:
    """deployment["served_model"] (model.onnx when absent), refused unless a file the manifest hashes."""
    name = str((manifest.deployment or {}).get("served_model", ONNX))
    if name not in (ONNX, INT8_ONNX) or name not in manifest.sha256:
        raise CheckpointError(f"manifest names served model {name!r}, which is not {ONNX} or {INT8_ONNX} with a "
                              "recorded sha256; re-export the bundle")
    return name


def onnx_only(manifest: Manifest) -> bool:
    """A bundle made from a user's ONNX model: no weights, served and checked by ONNX Runtime only."""
    return manifest.backbone.get("name") == ONNX_ONLY_BACKBONE
