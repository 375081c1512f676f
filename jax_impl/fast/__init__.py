"""The CPU fast path, behind one switch: layers that compute the plain model's maths the way
XLA:CPU runs fastest (`layers`, built on `ops`), the `--ops` choice between them and the plain
layers (`choice`), and the compile clock the trainer reports compile time with.

The teaching code (jax_impl.model, training, the trainer) meets the model first and imports
this package only where a run picks its layers (`choice.layers_for`) and reads its compile time.
Measurements behind each piece: docs/fast_layers.md.
"""
