"""Evaluation of a trained DALL-E (DESIGN.md, Evaluation).

- :mod:`.estimates` — means with standard errors over captions, and the
  expected value of the best of n candidates out of N drawn.
- :mod:`.clip_score` — the CLIP score of the top-ranked sample for
  N = 1, 2, 4, … (the paper's reranking curve).
- :mod:`.fid` — the Fréchet distance between generated and real images in a
  pluggable feature space (our CLIP's image encoder by default).
- :mod:`.shapes_accuracy` — exact caption accuracy on the synthetic ``shapes``
  data, for seen and held-out colour–shape pairings, and the dVAE's ceiling.
- :mod:`.eval_sets` — the fixed caption sets (with their real images) to evaluate on.
- :mod:`.evaluate` — all of the above for one (DALL-E, dVAE, CLIP) on one caption set.
"""
