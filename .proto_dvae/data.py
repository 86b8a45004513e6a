import io, numpy as np, torch
from PIL import Image
from dalle_lightning.synth.shapes_dataset import ShapesConfig, make_example
from dalle_lightning.synth.shapes import render

def jpeg(img):
    b = io.BytesIO(); img.save(b, format="JPEG", quality=95); b.seek(0)
    return np.asarray(Image.open(b).convert("RGB"))

def make(n, size, seed=0, split="train", offset=0):
    cfg = ShapesConfig(n=offset+n*2, size=size, seed=seed)
    imgs, truths = [], []
    i = offset
    while len(imgs) < n:
        scene, cap, sp = make_example(cfg, i); i += 1
        if split and sp != split: continue
        imgs.append(jpeg(render(scene, size))); truths.append(list(scene.objects))
    return np.stack(imgs), truths
