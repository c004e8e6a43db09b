from scm_graph.eval.cli import main

main()
