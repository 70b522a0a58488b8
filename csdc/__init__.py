"""csdc: compile quantized ONNX networks into integer-only, spike-driven networks and run them."""

__version__ = "0.1.0"
