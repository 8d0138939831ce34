"""The induction-circuit study: exploratory baselines, the onset rule, and (later) the patterning arms."""
