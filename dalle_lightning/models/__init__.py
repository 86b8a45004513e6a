"""Models of the pipeline, one module each: the discrete VAE (:mod:`.dvae`) and its schedules (:mod:`.schedules`),
the DALL-E transformer (:mod:`.transformer`) and its attention masks (:mod:`.attention_masks`),
CLIP (:mod:`.clip`: a ViT and a text transformer trained contrastively, ``save_clip`` / ``load_clip``)
and what scoring needs of a CLIP (:mod:`.clip_scorer`: the ``ClipScorer`` protocol, our trained model
or a pretrained open_clip one behind it).

A trained transformer is saved and loaded with
:func:`~dalle_lightning.training.dalle_train.save_dalle` / :func:`~dalle_lightning.training.dalle_train.load_dalle`.
"""
