"""Latency measurement of an ``nn.Module`` or an ONNX file (TensorRT, ONNX Runtime, torch).

This package never imports ``updp.pruner`` or ``updp.search``.
"""
