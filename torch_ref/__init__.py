"""PyTorch reference: the ERA V1 Session 6 model as it was written, trained the PyTorch way."""
