"""The training report: `python -m scm_graph.report RUN [RUN ...] [--out DIR]` reads run folders' metrics.jsonl
(`runs`), plots each quantity over images with the runs overlaid (`plots`: a PNG and the exact series as JSON)
and writes one static page (`page`: index.html, a table per run, the latest sample grid of each).

Torch-free: it reads the run folder's files only, so it starts in a second and runs beside a training.
"""
