"""How an encoder lays out the classes: per-class spread, distances between class centroids and a
2-D projection, in units of the embedding's own overall spread so that encoders with different
scales (an autoencoder's code, a classifier's features) compare.

Written at the end of a pretraining stage as ``embeddings.pt`` beside its checkpoint; the report
reads it back from MLflow like the reconstruction samples, so it needs no data set.
"""

from __future__ import annotations

import torch
from torch import Tensor


def embedding_stats(z: Tensor, y: Tensor, num_classes: int, keep: int = 2000) -> dict:
    """Statistics of embeddings ``z`` (N, F) of images labelled ``y`` (N,).

    - ``scale``: root mean squared distance of all points to their mean (the unit of what follows);
    - ``spread``: per class, root mean squared distance of its points to its centroid, over ``scale``;
    - ``centroid_dist``: (classes, classes) Euclidean distances between class centroids, over ``scale``;
    - ``separation``: mean off-diagonal centroid distance over mean spread (higher: classes further
      apart than they are wide);
    - ``projection``/``labels``: the first ``keep`` points on the embedding's top two principal axes.
    """
    z, y = z.float().cpu(), y.cpu()
    centred = z - z.mean(0)
    scale = centred.pow(2).sum(1).mean().sqrt().clamp(min=1e-12)
    centroids = torch.stack([z[y == c].mean(0) for c in range(num_classes)])
    spread = torch.stack([(z[y == c] - centroids[c]).pow(2).sum(1).mean().sqrt() for c in range(num_classes)]) / scale
    dist = torch.cdist(centroids, centroids) / scale
    off = ~torch.eye(num_classes, dtype=torch.bool)
    _, _, v = torch.linalg.svd(centred[:keep], full_matrices=False)
    projection = centred[:keep] @ v[:2].T / scale
    return {"scale": float(scale), "spread": spread, "centroid_dist": dist,
            "separation": float(dist[off].mean() / spread.mean()), "projection": projection, "labels": y[:keep]}
