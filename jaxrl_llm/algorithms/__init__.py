"""Training algorithms, each a factory of pure `step(state, batch, key) -> (state, metrics)`."""
