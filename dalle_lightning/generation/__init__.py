"""Generation: sampling image tokens from the transformer (:mod:`.sampling`) and decoding them with the dVAE."""
