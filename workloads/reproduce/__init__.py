"""`python -m workloads.reproduce`: the paper's findings reproduced as studies on the shapes data."""
