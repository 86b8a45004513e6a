"""Local HTTP serving of image folders, so the real download stage can run with no internet.

:class:`~dalle_lightning.serving.image_server.ImageServer` serves a folder on
127.0.0.1 (with injectable faults for tests and demos) and
:func:`~dalle_lightning.serving.image_server.url_list_for_folder` turns the
folder into a ``sources`` URL list pointing at it.
"""
