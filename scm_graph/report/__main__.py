from scm_graph.report.cli import main

main()
