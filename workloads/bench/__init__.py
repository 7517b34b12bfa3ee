"""Benchmarks that print ratios against a baseline measured in the same run, and the GPU checks:
`python -m workloads.bench.model` (our MM-DiT against diffusers'), `.train` (streaming input, ZeRO state bytes),
`.preprocess` (the Ray Data job against a plain loop), `.gpu_check` (the MM-DiT on a GPU). The harness that times
the encoders and the whole job on a lent GPU machine is `tools/gpu/`, outside the package."""
