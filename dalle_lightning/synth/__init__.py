"""Synthetic data the project makes itself, with exact ground truth.

``shapes`` renders one or two coloured shapes on a plain background with a
caption ("a large red circle above a small blue square"); ``checker`` reads
colour, shape, size and position back from pixels, so generated images can be
scored against their caption with no learned judge (DESIGN.md, Evaluation).
"""
