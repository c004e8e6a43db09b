"""Evaluation: `frechet` (the Frechet distance of feature statistics), `digits` (the digits classifier
and digits FD), `evaluator` (scoring a generator at several step counts) and the CLI
(`python -m scm_graph.eval`). Inception FID and FD_DINOv2 will sit beside `digits`.
"""
