"""cim-jax: Correlational Image Modeling (CVPR 2023) in JAX/Flax."""
