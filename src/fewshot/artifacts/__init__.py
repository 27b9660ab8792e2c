"""artifacts stage: self-describing bundles (safetensors + ONNX + JSON manifest), parity checks,
unknown-rejection calibration (open-set rules) and the embedders the service runs."""

from fewshot.artifacts.bundle import Bundle, export_bundle, load_bundle
from fewshot.artifacts.calibration import (
    Calibration,
    calibrate_open_set,
)
from fewshot.artifacts.embedders import Embedder, OnnxEmbedder, TorchEmbedder
from fewshot.artifacts.manifest import BUNDLE_FORMAT_VERSION, Manifest
from fewshot.artifacts.onnx_export import PARITY_TOLERANCE, ParityError, check_parity, export_onnx

__all__ = [
    "BUNDLE_FORMAT_VERSION", "PARITY_TOLERANCE", "Bundle", "Calibration", "Embedder", "Manifest",
    "OnnxEmbedder", "ParityError", "TorchEmbedder", "calibrate_open_set",
    "check_parity", "export_bundle", "export_onnx", "load_bundle",
]
