"""Data curation by hierarchical k-means with resampling and balanced sampling (arXiv 2405.15613).

``embed`` (shards -> per-shard Parquet embeddings, Ray Data actors) -> ``table`` (embeddings ->
object-store blocks) -> ``hierarchy`` (levels of ``hkmeans``: distributed k-means++ / Lloyd /
resampling over the ``kmeans`` kernels and ``blocks`` executors; ``split`` for very large levels)
-> ``sampling`` (balanced, top-down) -> ``report`` and ``export``; ``pipeline`` runs them all.
"""
