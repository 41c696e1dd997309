"""Speed and memory anchors: each of ours side by side with its anchor measured in the same run (``python -m
benchmarks.speed.<name> [--device cpu|cuda] [--quick]``), printing one JSON object last."""
