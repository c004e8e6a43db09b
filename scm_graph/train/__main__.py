from scm_graph.train.cli import main

main()
