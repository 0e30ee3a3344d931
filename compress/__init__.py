"""Compression stages of the job graph: sparsify, quantize, distill (algorithm code is pure where it can be)."""
