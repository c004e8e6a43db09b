"""scm_graph: continuous-time consistency models (sCT, sCD) and their baselines in PyTorch."""

__version__ = "0.1.0"
