"""Models of the pipeline, one module each: the discrete VAE (:mod:`.dvae`) and its schedules (:mod:`.schedules`)."""
