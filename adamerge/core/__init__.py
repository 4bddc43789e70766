"""The merge itself: task vectors, coefficient layouts and constraints, the functional merged
model. Imports only :mod:`adamerge.io`."""
