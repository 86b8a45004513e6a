"""Training: thin LightningModules and the runs that drive them.

- dVAE: :mod:`.dvae_module` (loss, schedules, EMA, reconstruction grids) and
  :mod:`.dvae_train` (:class:`~.dvae_train.DVAETrainConfig`, presets, ``train_dvae``, entry point);
- transformer: :mod:`.dalle_module` (loss, AdamW with decay on matrices only,
  warmup + cosine, caption dropout, EMA, sample grids) and :mod:`.dalle_train`
  (:class:`~.dalle_train.DalleTrainConfig`, presets, ``train_dalle``,
  ``save_dalle`` / ``load_dalle``, entry point for DDP / FSDP launches);
- CLIP: :mod:`.clip_module` (symmetric InfoNCE with negatives gathered over
  DDP ranks, AdamW with decay on matrices only, warmup + cosine) and
  :mod:`.clip_train` (:class:`~.clip_train.ClipTrainConfig`, presets, ``train_clip``, entry point).
"""
