"""A trained classifier in forms that run without this package or its model code: a ``torch.export`` program
(``model.pt2``) and ONNX (``model.onnx``, opset ``ONNX_OPSET``, a dynamic batch dimension) for ONNX Runtime,
beside the reference's TorchScript (``evaluation.compile_model``). Each maps a normalized float batch
``image`` (N, 3, size, size) to ``logits`` (N, labels)."""

from __future__ import annotations

import io
import warnings
from typing import Callable

import numpy as np
import torch
from torch import nn

ONNX_OPSET = 18  # pinned (ONNX Runtime runs it from 1.14 on)
INPUT, OUTPUT = "image", "logits"
MAX_BATCH = 4096


def export_program(model: nn.Module, image_size: int) -> torch.export.ExportedProgram:
    """``model`` (eval mode, on CPU) captured by ``torch.export`` with a dynamic batch dimension."""
    model = model.eval().to("cpu")
    example = torch.rand(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))


def program_bytes(program: torch.export.ExportedProgram) -> bytes:
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def load_program(data: bytes) -> nn.Module:
    """The module of a saved ``torch.export`` program: call it on a batch."""
    return torch.export.load(io.BytesIO(data)).module()


def onnx_bytes(program: torch.export.ExportedProgram) -> bytes:
    """The exported program as an ONNX model (torch's dynamo exporter, opset ``ONNX_OPSET``); input ``image``
    and output ``logits`` with their first dimension named ``batch``. Not optimized here: ONNX Runtime
    optimizes the graph when it loads it (half the export time, the same outputs)."""
    with warnings.catch_warnings():  # the exporter's progress notes
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(program, dynamo=True, opset_version=ONNX_OPSET, input_names=[INPUT],
                                         output_names=[OUTPUT], optimize=False, verbose=False)
    proto = onnx_program.model_proto
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    return proto.SerializeToString()


class OnnxModel:
    """An ONNX classifier on ONNX Runtime, called like a module: a float batch tensor in, logits out. CUDA
    when asked for and ONNX Runtime has it, else CPU with as many intra-op threads as torch uses (ONNX
    Runtime's own default counts physical cores: half the speed on a 2-vCPU machine)."""

    def __init__(self, data: bytes, device: str | torch.device = "cpu") -> None:
        import onnxruntime as ort

        wanted = ["CUDAExecutionProvider"] if torch.device(device).type == "cuda" else []
        providers = [p for p in wanted if p in ort.get_available_providers()] + ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = torch.get_num_threads()
        self.session = ort.InferenceSession(data, options, providers=providers)
        self.input = self.session.get_inputs()[0].name

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(images.detach().float().cpu().numpy())
        return torch.from_numpy(self.session.run(None, {self.input: batch})[0])


def max_difference(eager: nn.Module, other: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor) -> float:
    """The largest absolute difference between the eager model's softmax outputs and ``other``'s on
    ``batch`` (CPU, float32)."""
    with torch.no_grad():
        a = torch.softmax(eager.eval().to("cpu")(batch), dim=1)
        b = torch.softmax(other(batch).float(), dim=1)
    return float((a - b).abs().max())
