"""`python -m cim_jax.tools.memory`: the memory report of `compile_for --target=local`."""

from cim_jax.tools import compile_for

if __name__ == "__main__":
  compile_for.main()
