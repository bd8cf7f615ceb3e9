"""The GPU target: the quantized step graph on fused Triton INT8/FP8 kernels, no TensorRT."""
