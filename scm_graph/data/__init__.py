"""Data: sources -> shard writer -> manifest -> batch stream.

`digits`, `cifar10`, `folder` turn a data set into a `Source`; `writer` writes it as webdataset shards
with a `manifest`; `imagenet` lists a class-folder ImageNet that `resumable` writes as pixel or SD-VAE
latent shards (`codec`, `vae`), resuming a stopped job; `stream` reads them back as deterministic, resumable batches in model units
(`normalize`). The writer and the reader share only the manifest.
"""
