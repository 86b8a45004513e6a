"""Models of the pipeline, one module each: the discrete VAE (:mod:`.dvae`) and its schedules (:mod:`.schedules`),
the DALL-E transformer (:mod:`.transformer`) and its attention masks (:mod:`.attention_masks`).

A trained transformer is saved and loaded with
:func:`~dalle_lightning.training.dalle_train.save_dalle` / :func:`~dalle_lightning.training.dalle_train.load_dalle`.
"""
