"""GenEval on shapes: prompt sets, the detector, GenEval's scoring and the evaluation job (`python -m
workloads.evaluate`)."""
