"""`python -m seer_jax.generate`: see `seer_jax.generate.cli`."""

from seer_jax.generate.cli import main

main()
