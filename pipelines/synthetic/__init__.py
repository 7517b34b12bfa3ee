"""Stand-ins built on this machine: the shapes dataset (`shapes`, written by `python -m pipelines.make_shapes`), the
shapes autoencoder (`shapes_vae`, whose trained weights the repository ships) and the tiny randomly initialised text
encoders and captioner (`tiny_models`) with the real classes."""
