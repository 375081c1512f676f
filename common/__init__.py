"""Framework-neutral core that both trainers call: a library, which names neither of them.

Everything here imports NumPy and the standard library only (matplotlib and tqdm for the
report and progress helpers), so that both frameworks read the same facts, the same data
and the same augmented pixels from one place.
"""
