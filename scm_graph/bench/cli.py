"""`python -m scm_graph.bench step ...` (the train steps, `bench.step`), `python -m scm_graph.bench attention ...`
(the attention JVP op, `bench.attention`) or `python -m scm_graph.bench memory ...` (per-rank memory of
multi-process training, `bench.memory`) or `python -m scm_graph.bench encode ...` (ImageNet preprocessing and SD-VAE
encoding for `shard imagenet --vae`, `bench.encode`) or `python -m scm_graph.bench data ...` (images/s of the shard
stream per DataLoader worker count against the trainer's consumption, and what ImageNet-64 needs, `bench.data`) or
`python -m scm_graph.bench cold ...` (the first compiled train step on empty compile caches, each run in its own
process, and where its time goes, `bench.cold`)."""

from __future__ import annotations

from scm_graph.errors import UserError, cli_main


@cli_main
def main(argv: list[str]) -> None:
    if argv[:1] == ["attention"]:
        from scm_graph.bench.attention import main as attention_main

        return attention_main(argv[1:])
    if argv[:1] == ["step"]:
        from scm_graph.bench.step import main as step_main

        return step_main(argv[1:])
    if argv[:1] == ["memory"]:
        from scm_graph.bench.memory import main as memory_main

        return memory_main(argv[1:])
    if argv[:1] == ["encode"]:
        from scm_graph.bench.encode import main as encode_main

        return encode_main(argv[1:])
    if argv[:1] == ["cold"]:
        from scm_graph.bench.cold import main as cold_main

        return cold_main(argv[1:])
    if argv[:1] == ["data"]:
        from scm_graph.bench.data import main as data_main

        return data_main(argv[1:])
    raise UserError("usage: python -m scm_graph.bench {step,attention,memory,encode,data,cold} [--help]")
