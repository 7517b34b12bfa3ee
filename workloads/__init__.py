"""Jobs that run on a Ray cluster, one package each, over the Ray entry point in `runtime`:

- `train`: `python -m workloads.train`, MM-DiT training on Ray Train + DeepSpeed (driver, worker loop, one rank's
  trainer, distribution, inputs, checkpoints, EMA, validation, run log).
- `sweep`: `python -m workloads.sweep`, studies on Ray Tune (driver, studies, scaling fits, sample metrics).
- `demo`: `python -m workloads.demo` (`make demo`), the main job end to end, and its report.
- `bench`: benchmarks and GPU checks (`python -m workloads.bench.model`, `.train`, `.preprocess`, `.gpu_check`).
- `plots`: the matplotlib figures the jobs share (sample grids, loss curves).
"""
