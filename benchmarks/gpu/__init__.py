"""The GPU check (``bash benchmarks/gpu/gpu_check.sh``: CUDA tests and the speed anchors on one GPU) and the README's
GPU table rendered from its committed JSON (``python -m benchmarks.gpu.gpu_report``)."""
