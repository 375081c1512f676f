"""Pure-functional JAX/Flax twin of torch_ref: explicit parameter and statistics pytrees,
jit-compiled steps, explicit random keys, nothing mutated in place."""
