"""The Session 6 model and its training in Flax NNX, beside torch_ref (PyTorch) and jax_impl (Flax linen)."""
