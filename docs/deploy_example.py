"""Classify one image with an exported model, using nothing but onnxruntime, Pillow and numpy (the README's example).

python docs/deploy_example.py data/export/logreg.onnx photo.jpg
"""

import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

session = ort.InferenceSession(sys.argv[1])
meta = {key: json.loads(value) for key, value in session.get_modelmeta().custom_metadata_map.items()}
p = meta["preprocessing"]  # shorter side to p["resize"], then a centre crop of p["crop"]; mean and std: inside
image = ImageOps.exif_transpose(Image.open(sys.argv[2])).convert("RGB")
w, h = image.size
size = (p["resize"], int(p["resize"] * h / w)) if w <= h else (int(p["resize"] * w / h), p["resize"])
image = image.resize(size, Image.Resampling[p["interpolation"].upper()])
left, top = round((size[0] - p["crop"]) / 2), round((size[1] - p["crop"]) / 2)
pixels = np.asarray(image.crop((left, top, left + p["crop"], top + p["crop"]))).transpose(2, 0, 1)  # uint8 CHW
probabilities = session.run(["probabilities"], {"image": pixels[None]})[0][0]
print(meta["classes"][probabilities.argmax()], f"{probabilities.max():.4f}")
