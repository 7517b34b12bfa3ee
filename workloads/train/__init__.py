"""`python -m workloads.train`: MM-DiT training on Ray Train + DeepSpeed.

`driver` checks the config against the data and runs the `TorchTrainer`; each Ray Train worker runs
`worker.train_loop`, which drives one rank's `trainer.Trainer` (DeepSpeed engine, EMA, step) with the components
that own their cadence: `checkpointing`, `validation`, `runlog`. `distribute` applies ZeRO and activation
checkpointing from outside `model/`; `data` and `streaming` are the input; `initialize` loads `init_from=` weights.
"""
