"""Model specs, example inputs, and pickle-free save/load."""
