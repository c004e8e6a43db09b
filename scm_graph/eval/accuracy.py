"""Label accuracy of class-conditional digits samples: the fraction that the digits classifier of
`scm_graph.eval.digits` (the FD's feature network) assigns to the class they were sampled for.

Classifier-free guidance (and a guidance-distilled sCD student's s input) should raise it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from scm_graph.errors import UserError
from scm_graph.eval.digits import DigitsClassifier, digits_predictions
from scm_graph.sample.generate import Generator, generate, to_uint8


def images_label_accuracy(
    images: Tensor | np.ndarray, labels: Tensor | np.ndarray, model: DigitsClassifier | None = None
) -> float:
    """Fraction of images (0..255 units) whose predicted class equals their label."""
    y = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels).astype(np.int64).reshape(-1)
    pred = digits_predictions(images, model)
    if pred.shape[0] != y.shape[0]:
        raise UserError(f"{pred.shape[0]} images but {y.shape[0]} labels")
    if y.shape[0] == 0:
        raise UserError("need at least 1 image")
    return float((pred == y).mean())


def label_accuracy(
    g: Generator,
    labels: Tensor,
    steps: int = 2,
    solver: str = "heun",
    guidance: float = 1.0,
    seed: int = 0,
    batch: int = 1024,
) -> float:
    """Sample one image per entry of `labels` (classifier-free guidance scale `guidance`), classify them,
    and return the fraction predicted as the label asked for."""
    if (g.spec.data.channels, g.spec.data.resolution) != (1, 8):
        raise UserError("label accuracy is only defined for the 8x8 digits")
    if not g.spec.net.class_conditional:
        raise UserError("label accuracy needs a class-conditional model")
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    x = generate(g, labels.shape[0], steps=steps, solver=solver, seed=seed, batch=batch, labels=labels,
                 guidance=guidance)
    return images_label_accuracy(to_uint8(x, g.spec), labels)
