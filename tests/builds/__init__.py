"""Build tooling for the test engines: the real llama-server and its tiny model (not part of the product)."""
