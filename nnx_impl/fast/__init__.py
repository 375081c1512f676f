"""The NNX model's layers computed the way XLA:CPU runs fastest, on the linen twin's operations
(jax_impl.fast.ops); `--ops` chooses them as it does for linen (jax_impl.fast.choice)."""
