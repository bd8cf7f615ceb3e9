"""Backends: ONNX (QDQ) export, onnxruntime, TensorRT, torch runners."""
