"""Measuring: quality metrics, profiles of a model (MACs, size, latency of its ONNX
export), benchmarks on targets, and the targets themselves."""
