"""`distrain export --model RUN/model --format torchscript|onnx|safetensors --out FILE [--input uint8|float]`

TorchScript and ONNX files take RGB images [B, 3, S, S] (resized and center-cropped as the model's config.json
says; uint8 0–255 by default, or float 0–1 with `--input float`), normalize inside, and return logits; the batch
axis is dynamic. safetensors holds the plain state dict (its model takes normalized float images). Each export is
loaded back (torch.jit.load / onnxruntime / safetensors into the model) and compared with the PyTorch model on
sample images; it fails above `--atol`. Ends with one JSON line: format, out, max_abs_diff, bytes.
"""

from distrain.cli import CommandError, count, emit_json, number


def add_arguments(parser):
    parser.add_argument("--model", "-m", required=True, help="a model/ folder written by `distrain train`")
    parser.add_argument("--format", "-f", required=True, choices=["torchscript", "onnx", "safetensors"])
    parser.add_argument("--out", "-o", required=True, help="output file")
    parser.add_argument("--input", default="uint8", choices=["uint8", "float"],
                        help="TorchScript/ONNX input: uint8 0-255 (default) or float 0-1 images")
    parser.add_argument("--opset", type=count(7), default=17, help="ONNX opset")
    parser.add_argument("--atol", type=number(0.0), default=1e-3,
                        help="largest allowed logit difference from PyTorch (default 1e-3)")


def run(args) -> int:
    from distrain.inference.export import ExportError, export_model
    from distrain.models.folder import ModelDirError

    try:
        r = export_model(args.model, args.format, args.out, input_kind=args.input, opset=args.opset,
                         atol=args.atol)
    except (ExportError, ModelDirError) as e:
        raise CommandError(str(e)) from None
    print(f"wrote {r['out']} ({r['format']}, {r['bytes']:,} bytes)")
    print(f"input  {r['input']}, normalization {r['normalization']}")
    print(f"output {r['output']}")
    print(f"check  max |logits - PyTorch| = {r['max_abs_diff']:.3g} on sample batches of {r['checked_batches']}")
    emit_json(r)
    return 0
