"""Training: the compiled train step (`step`), the EMA (`ema`), the loop around them (`loop`) and its CLI (`cli`).

`python -m scm_graph.train specs/NAME.py [--resume] [--field.sub value ...]` runs `cli.main`.
"""
