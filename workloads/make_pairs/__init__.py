"""`python -m workloads.make_pairs`: preference pairs sampled from a run and judged by GenEval-shapes."""
