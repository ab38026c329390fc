"""Moved: `python -m cim_jax.tools.show_pairs` (same flags)."""

if __name__ == "__main__":
  raise SystemExit("error: python -m cim_jax.data.show_pairs moved to python -m "
                   "cim_jax.tools.show_pairs (same flags)")
