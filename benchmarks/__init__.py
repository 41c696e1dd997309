"""Side-by-side benchmarks against the anchors; each prints one JSON object last."""
