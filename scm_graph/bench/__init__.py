"""Benchmarks (`just bench step`, `just bench attention`): side-by-side timings in one process, the device
named, markdown tables appended under docs/. `common` holds what both share.
"""
