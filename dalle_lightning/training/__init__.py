"""Training: thin LightningModules (:mod:`.dvae_module`) and the runs that drive them (:mod:`.dvae_train`)."""
