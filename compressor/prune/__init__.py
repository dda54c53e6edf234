"""Structured pruning of the shared encoder (attention heads, FFN neurons, whole layers) and vocabulary pruning.

Three layers, as in Torch-Pruning: *which* weights are coupled (``groups``: torch-pruning's dependency graph,
restricted to one layer's Q/K/V/O or FFN in/out), *how much* each unit matters (``importance``), and *what to
remove when* (``select`` + ``pruner``). The hidden size is never pruned, so every task head stays intact.
"""
