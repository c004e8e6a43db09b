from scm_graph.sample.cli import main

main()
