"""Stage entry points (extract, train, evaluate, score) and the `mimic` CLI."""
