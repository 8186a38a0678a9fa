"""Turning a plan into artifacts (needs torch; runs on a workstation): the device
head as an ONNX graph for onnxruntime, the cloud tail as safetensors."""

from splitlm.export.build import EXPORT_FORMAT, ExportResult, check_parity, export_artifacts, export_head, export_head_onnx

__all__ = ["EXPORT_FORMAT", "ExportResult", "check_parity", "export_artifacts", "export_head", "export_head_onnx"]
