"""The registered model's code (MLflow "models from code"): a pyfunc that classifies a batch of crops.

MLflow copies this file into the model; loading it needs MLflow, PyTorch, torchvision and Pillow, not
animl-assets. Input: a DataFrame with an ``image`` column of encoded crops (JPEG/PNG bytes). Output: one
probability column per label, in ``label_index.json`` order. Preprocessing is the evaluation's: resize of
the short side to the model's input size (its interpolation, bicubic by default), centre crop,
normalization with the stored mean and std (``preprocessing.json``).
"""

import io
import json

import mlflow
import pandas as pd
import torch
from PIL import Image
from torchvision.transforms import v2


class CropClassifier(mlflow.pyfunc.PythonModel):
    """A TorchScript species classifier with its labels and preprocessing."""

    batch_size = 64

    def load_context(self, context):
        files = context.artifacts
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = torch.jit.load(files["torchscript"], map_location=self.device).eval()
        with open(files["label_index"]) as f:
            index = json.load(f)
        self.labels = [index[str(i)] for i in range(len(index))]
        with open(files["preprocessing"]) as f:
            prep = json.load(f)
        size = int(prep["image_size"])
        interpolation = v2.InterpolationMode(prep.get("interpolation", "bicubic"))
        self.transform = v2.Compose([
            v2.Resize(size, interpolation=interpolation, antialias=True), v2.CenterCrop(size),
            v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(prep["mean"], prep["std"]),
        ])

    def _tensor(self, data):
        with Image.open(io.BytesIO(bytes(data))) as image:
            return self.transform(image.convert("RGB"))

    def predict(self, context, model_input, params=None):
        images = list(model_input["image"])
        probs = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                batch = torch.stack([self._tensor(b) for b in images[start:start + self.batch_size]])
                probs.append(torch.softmax(self.model(batch.to(self.device)).float(), dim=1).cpu())
        values = torch.cat(probs).numpy() if probs else []
        return pd.DataFrame(values, columns=self.labels)


mlflow.models.set_model(CropClassifier())
