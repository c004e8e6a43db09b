"""Benchmarks (`just bench step | attention | memory | encode | data | cold`): timings with the device named, side by
side in one process (or, for `cold`, a fresh process per run), markdown tables appended under docs/. `common` holds
what they share.
"""
