"""One module per op; each registers its cases with kdops.bench.register."""
