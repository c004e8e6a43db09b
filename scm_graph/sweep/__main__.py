from scm_graph.sweep.cli import main

main()
