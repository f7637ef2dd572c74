"""One script per paper claim or open question; see experiments/README.md."""
