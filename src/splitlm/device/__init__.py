"""The device side: ONNX export of the head (needs torch, runs on a workstation) and the
onnxruntime runtime (numpy, onnxruntime, tokenizers only: what goes on the edge).

Importing this package imports neither torch nor onnxruntime.
"""
