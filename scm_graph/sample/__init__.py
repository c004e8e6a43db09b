"""Sampling: `samplers` (multistep consistency, PF-ODE Euler / Heun) over a TrigFlowModel, `generate`
(a model rebuilt from a checkpoint, n samples), `grid` (PNG grids) and the CLI (`python -m scm_graph.sample`).
"""
