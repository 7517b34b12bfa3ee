"""`python -m workloads.reference`: the shapes reference model made again (`driver`); its shipped copy (`shipped`)."""
