"""dalle-lightning: DALL-E reproduced end to end (data stages, dVAE, transformer, CLIP)."""

import os

# albumentations (imported by img2dataset) phones home for updates at import time.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
