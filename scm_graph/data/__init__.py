"""Data: sources -> shard writer -> manifest -> batch stream.

`digits`, `cifar10`, `folder` turn a data set into a `Source`; `writer` writes it as webdataset shards
with a `manifest`; `stream` reads them back as deterministic, resumable batches in model units
(`normalize`). The writer and the reader share only the manifest.
"""
