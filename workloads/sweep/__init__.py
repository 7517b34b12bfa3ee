"""`python -m workloads.sweep`: the paper's studies on Ray Tune. `driver` runs one trial per configuration (each a
`workloads.train` run), `studies` defines each study's trials and analysis, `scaling` fits power laws and
`evaluation` computes sample metrics of a finished run."""
