"""Export a model/ folder to TorchScript, ONNX or safetensors, each checked against the PyTorch model.

Usage:
    from distrain.inference.export import export_model, load_exported
    r = export_model("runs/x/model", "onnx", "model.onnx")          # input="uint8" (default) or "float"
    r["max_abs_diff"], r["bytes"], r["input"], r["normalization"]
    run = load_exported("onnx", "model.onnx")                        # callable: numpy images -> numpy logits
    logits = run(images_uint8_nchw)

What the files take and give:
    torchscript, onnx   images [B, 3, S, S] RGB, S = preprocess.image_size, already resized and center-cropped
                        the way config.json's `preprocess` says; uint8 0–255 (input="uint8") or float 0–1
                        (input="float"). The mean/std normalization is inside the file. Output: logits
                        [B, classes] (softmax for probabilities). The batch axis is dynamic.
    safetensors         the classifier's plain state dict (load it into `create_model(ModelSpec.from_dict(spec))`
                        with the spec stored in the file); that model takes *normalized* float images.
Every file carries its own description: classes, preprocessing, input and output (TorchScript: extra file
`distrain.json`; ONNX: metadata_props; safetensors: header metadata), so nothing else needs to ship with it.

The check: the file is written under a temporary name next to `out`, loaded back (torch.jit.load, onnxruntime,
safetensors into a fresh model) and run on sample images; the largest absolute logit difference from the PyTorch
model must be below `atol`. Only then is it renamed to `out`: an export that fails its check never replaces a good
file. ONNX uses the TorchScript-based exporter (`dynamo=False`): the torch.export-based one needs the
`onnxscript` package. The ONNX file is checked with batch sizes other than the export's, so a batch axis that
was not really dynamic fails here.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

FORMATS = ("torchscript", "onnx", "safetensors")
INPUTS = ("uint8", "float")


class ExportError(ValueError):
    """An export that failed or does not match the PyTorch model."""


class Normalized(nn.Module):
    """The classifier behind its input normalization: uint8 0–255 (or float 0–1) RGB in, logits out."""

    def __init__(self, model: nn.Module, mean, std, input_kind: str = "uint8"):
        super().__init__()
        if input_kind not in INPUTS:
            raise ExportError(f"input must be one of {', '.join(INPUTS)}, got {input_kind!r}")
        self.model = model
        self.input_kind = input_kind
        scale = 1.0 / 255.0 if input_kind == "uint8" else 1.0
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        # x * scale / std - mean / std: one multiply-add, the same as the training pipeline's to_device
        self.register_buffer("mul", scale / std_t)
        self.register_buffer("sub", mean_t / std_t)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.float() * self.mul - self.sub)


def describe(loaded, fmt: str, input_kind: str) -> dict[str, Any]:
    """What the exported file expects and returns (stored inside it)."""
    pre = loaded.preprocess
    s = int(pre["image_size"])
    if fmt == "safetensors":
        inp = {"shape": ["B", 3, s, s], "dtype": "float32", "layout": "RGB, NCHW",
               "normalization": f"not included: (x/255 - mean) / std with mean {pre['mean']}, std {pre['std']}"}
        how = ("distrain.models.create_model(ModelSpec.from_dict(description['spec']).replace(weights='none'))"
               ".load_state_dict(state)")
    else:
        inp = {"shape": ["B", 3, s, s], "dtype": "uint8" if input_kind == "uint8" else "float32",
               "range": "0-255" if input_kind == "uint8" else "0-1", "layout": "RGB, NCHW",
               "normalization": "included"}
        how = ""
    return {"format": fmt, "distrain_model": "distrain-model/2", "backbone": loaded.spec.backbone,
            "spec": loaded.spec.to_dict(), "classes": list(loaded.classes), "preprocess": pre, "input": inp,
            "output": {"shape": ["B", len(loaded.classes)], "meaning": "logits (softmax gives probabilities)"},
            "load": how, "provenance": loaded.meta.get("provenance", {})}


def sample_inputs(image_size: int, batch_sizes=(2, 3), seed: int = 0, images: list[np.ndarray] | None = None
                  ) -> list[torch.Tensor]:
    """uint8 [B, 3, S, S] check batches: the given images (model-size crops) or random pixels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in batch_sizes:
        out.append(torch.randint(0, 256, (b, 3, image_size, image_size), generator=g, dtype=torch.uint8))
    if images:
        out.insert(0, torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous())
    return out


def _as_input(x: torch.Tensor, input_kind: str) -> torch.Tensor:
    return x if input_kind == "uint8" else x.float() / 255.0


def export_model(model_dir: str, fmt: str, out: str, *, input_kind: str = "uint8", opset: int = 17,
                 atol: float = 1e-3, samples: list[np.ndarray] | None = None) -> dict:
    """Write `out` in `fmt`, load it back, compare with PyTorch; returns {format, out, max_abs_diff, bytes, ...}."""
    from distrain.models.folder import load_model_dir

    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if input_kind not in INPUTS:
        raise ExportError(f"input must be one of {', '.join(INPUTS)}, got {input_kind!r}")
    loaded = load_model_dir(model_dir)
    pre = loaded.preprocess
    size = int(pre["image_size"])
    wrapper = Normalized(loaded.model, pre["mean"], pre["std"], input_kind).eval()
    info = describe(loaded, fmt, input_kind)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    example = _as_input(sample_inputs(size, (2,), seed=1)[0], input_kind)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(out)}.", suffix=".tmp")
    os.close(fd)
    try:
        result = _export_and_check(loaded, wrapper, fmt, tmp, out, example, info, opset, input_kind, size, atol,
                                   samples)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    result.update(out=out, bytes=os.path.getsize(out))
    return result


def _export_and_check(loaded, wrapper, fmt, out, name, example, info, opset, input_kind, size, atol,
                      samples) -> dict:
    """Export to `out` (a temporary file) and check it; errors name `name`, the file asked for."""
    if fmt == "torchscript":
        _export_torchscript(wrapper, example, out, info)
    elif fmt == "onnx":
        _export_onnx(wrapper, example, out, info, opset)
    else:
        _export_safetensors(loaded.model, out, info)

    run = load_exported(fmt, out, info if fmt == "safetensors" else None)
    diffs = []
    with torch.no_grad():
        for x in sample_inputs(size, (2, 3, 1), seed=2, images=samples):
            ref = wrapper(_as_input(x, input_kind)).numpy()
            if fmt == "safetensors":  # the plain model: normalized input, as the file's description says
                got = run(((x.float() * wrapper.mul) - wrapper.sub).numpy())
            else:
                got = run(_as_input(x, input_kind).numpy())
            if got.shape != ref.shape:
                raise ExportError(f"{name}: output shape {got.shape} for input {tuple(x.shape)}, expected {ref.shape}")
            diffs.append(float(np.abs(got - ref).max()))
    max_diff = max(diffs)
    result = {"format": fmt, "out": out, "max_abs_diff": max_diff, "bytes": os.path.getsize(out),
              "input": info["input"]["dtype"] + (f" {info['input']['range']}" if "range" in info["input"] else "")
              + f" RGB [B, 3, {size}, {size}]",
              "normalization": "included" if fmt != "safetensors" else "not included",
              "output": f"logits [B, {len(loaded.classes)}]", "classes": len(loaded.classes),
              "checked_batches": [int(b) for b in (2, 3, 1)] + ([len(samples)] if samples else [])}
    if not max_diff <= atol:  # also catches NaN
        raise ExportError(f"{name}: exported {fmt} (not written) differs from the PyTorch model by {max_diff:.3g} "
                          f"(> atol {atol:g}) on sample images")
    return result


def _export_torchscript(wrapper: nn.Module, example: torch.Tensor, out: str, info: dict) -> None:
    with warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.export, yet TorchScript is still what C++ (libtorch),
        # TorchServe and mobile runtimes load; tracing a pure convnet is exact.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        with torch.no_grad():
            traced = torch.jit.trace(wrapper, example, check_trace=False)
        # Not frozen: torch.jit.freeze inlines the weights as constants, and such a module can no longer be moved
        # to a GPU with .to(); callers who want it run torch.jit.optimize_for_inference themselves.
        torch.jit.save(traced, out, _extra_files={"distrain.json": json.dumps(info)})


def _export_onnx(wrapper: nn.Module, example: torch.Tensor, out: str, info: dict, opset: int) -> None:
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(wrapper, (example,), out, dynamo=False, opset_version=opset, input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                          do_constant_folding=True)
    model = onnx.load(out)
    onnx.checker.check_model(model)
    for key, value in (("distrain", json.dumps(info)), ("classes", json.dumps(info["classes"]))):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    with open(out, "wb") as f:  # `out` is export_model's temporary file
        f.write(model.SerializeToString())


def _export_safetensors(model: nn.Module, out: str, info: dict) -> None:
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with open(out, "wb") as f:
        f.write(save(state, metadata={"distrain": json.dumps(info)}))


def _jit_load(path: str, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice (see _export_torchscript)
        return torch.jit.load(path, map_location="cpu", **kwargs)


def read_description(fmt: str, path: str) -> dict:
    """The description stored inside an exported file (classes, preprocessing, input, output)."""
    if fmt == "torchscript":
        extra = {"distrain.json": ""}
        _jit_load(path, _extra_files=extra)
        return json.loads(extra["distrain.json"])
    if fmt == "onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
        return json.loads(props["distrain"])
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["distrain"])


def load_exported(fmt: str, path: str, meta: dict | None = None):
    """A callable numpy images → numpy logits running the exported file (CPU)."""
    if fmt == "torchscript":
        module = _jit_load(path).eval()

        def run(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return module(torch.from_numpy(np.ascontiguousarray(x))).numpy()
        return run
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: np.ascontiguousarray(x)})[0]
    if fmt == "safetensors":
        from safetensors.torch import load_file

        from distrain.models import ModelSpec, create_model

        meta = meta or read_description(fmt, path)
        model = create_model(ModelSpec.from_dict(meta["spec"]).replace(weights="none", unfreeze_depth=0))
        model.load_state_dict(load_file(path))
        model.eval()

        def run_sd(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()
        return run_sd
    raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
