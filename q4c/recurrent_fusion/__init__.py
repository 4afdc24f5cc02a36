"""Recurrent fusion: graph-rewrite helpers for the fusion passes: a networkx data-flow view of one graph level,
constant/shape evaluation, and the decomposed-recurrent-cell matchers."""
