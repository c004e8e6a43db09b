"""The feature network of each metric (`feature_net`) and a cheap check that its weights are there."""

from __future__ import annotations

import torch

from scm_graph.eval.features import FeatureNet, FeatureWeights, check_metrics


def feature_net(metric: str, weights: FeatureWeights | None = None, device: torch.device | str = "cpu") -> FeatureNet:
    """The feature network of `metric`, its weights loaded from `weights` (one-line UserError when missing)."""
    check_metrics([metric])
    weights = weights or FeatureWeights()
    if metric == "fd_digits":
        from scm_graph.eval.digits import DigitsFeatures

        return DigitsFeatures()
    if metric == "fid":
        from scm_graph.eval.inception import InceptionFeatures

        return InceptionFeatures(weights.inception, device)
    from scm_graph.eval.dinov2 import DinoV2Features

    return DinoV2Features(weights.dinov2, device)


def check_weights(metrics: list[str] | tuple[str, ...], weights: FeatureWeights, flags: tuple[str, str] = ("--inception", "--dinov2")) -> None:
    """Cheap: every weight file the metrics need is where it should be (a one-line UserError naming the
    option `flags` that sets it if not); loads nothing."""
    check_metrics(metrics)
    if "fid" in metrics:
        from scm_graph.eval.inception import inception_file

        inception_file(weights.inception, flags[0])
    if "fd_dinov2" in metrics:
        from scm_graph.eval.dinov2 import dinov2_files

        dinov2_files(weights.dinov2, flags[1])
