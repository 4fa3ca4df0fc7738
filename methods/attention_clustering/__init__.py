"""Attention-guided pruning with online clustering (seed 003): the method (`method`), its k-means (`kmeans`)
and the distillation fine-tuning of the model (`distill`, run by `kvbench train attention_clustering`)."""

from kvbench.methods.attention_clustering.method import AttentionClustering, AttentionClusteringConfig

__all__ = ["AttentionClustering", "AttentionClusteringConfig"]
