"""Stand-ins built on this machine: the shapes dataset (`shapes`, written by `python -m pipelines.make_shapes`) and
the tiny randomly initialised VAE, text encoders and captioner (`tiny_models`) with the real classes."""
