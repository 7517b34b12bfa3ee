"""The GPU harness: the whole job and the encoders timed on one lent GPU machine (see README.md here)."""
