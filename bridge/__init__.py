"""The one package that imports both torch_ref and jax_impl: weight conversion between them."""
