"""Evaluation: Frechet metrics of generated samples.

`features` (the feature-network interface) with `digits` (fd_digits), `inception` (clean-fid's FID) and
`dinov2` (EDM2's FD_DINOv2), built by `registry`; `stream` (samples and real images, split over torchrun
processes) into `moments` (float64 sums); `frechet` (the one Frechet distance); `refs` (reference
statistics files); `evaluator` (scoring a generator at several step counts) and the CLI
(`python -m scm_graph.eval`, `python -m scm_graph.eval ref`).
"""
