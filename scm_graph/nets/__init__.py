"""Networks computing F(x, c_noise, cond) only; the TrigFlow wrapper lives in scm_graph.model."""
