"""Near-duplicate detection on Ray (the SD3 paper's appendix E): embeddings, faiss k-means, per-cluster range
search. `python -m pipelines.dedup`; `job` runs it, `clusters` holds the faiss math, `embedders` the image
embeddings, `stages` the per-item work and its files."""
