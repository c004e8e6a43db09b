import os
import sys

os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")

from scm_graph.bench.cli import main  # noqa: E402

main(sys.argv[1:])
