"""Stages: a backbone cut into an ordered list of parameter groups, stem first, last block last.

Usage:
    from distrain.models.stages import backbone_stages
    stages = backbone_stages(backbone, "timm:tf_efficientnet_lite0", prefix="backbone.")
    [s.name for s in stages]     # ['stem', 'blocks.0', ..., 'blocks.6', 'conv_head+bn2']

`unfreeze_depth = k` trains the last k stages, and layer-wise learning-rate decay gives each stage one rate,
so a stage should be a unit that makes sense to train or freeze as a whole: a resolution stage of a CNN, a
transformer block. timm models say what theirs are (`group_matcher(coarse=True)`, the same grouping timm's own
layer decay uses); torchvision models get the table below, one entry per family. Models outside the table fall
back to the children of `features` or the top-level children. Whatever a table leaves out (a final norm, a
pre-logits layer) joins the stage next to it, and every tensor of the backbone lands in exactly one stage
(checked).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn


@dataclass
class Stage:
    """One trainable unit of a backbone. Names are in the namespace of the module the stages were built for
    (a Classifier: `backbone.` + the library's names)."""

    name: str
    params: list[str]                                   # parameter names
    buffers: list[str] = field(default_factory=list)    # buffer names (BatchNorm running statistics, ...)
    modules: list[str] = field(default_factory=list)    # module prefixes, for stages defined by modules
    num_params: int = 0

    def __repr__(self) -> str:
        return f"Stage({self.name!r}, {len(self.params)} tensors, {self.num_params:,} params)"


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _out_channels(block: nn.Module) -> int | None:
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels if convs else None


def _runs(features: nn.Sequential, first: int, last: int) -> list[list[int]]:
    """Consecutive blocks with the same output width: the resolution stages of a MobileNet."""
    runs: list[list[int]] = []
    prev = None
    for i in range(first, last):
        width = _out_channels(features[i])
        if runs and width == prev:
            runs[-1].append(i)
        else:
            runs.append([i])
        prev = width
    return runs


def _span(prefix: str, idx: list[int]) -> str:
    return f"{prefix}.{idx[0]}" if len(idx) == 1 else f"{prefix}.{idx[0]}-{idx[-1]}"


def torchvision_table(arch: str, model: nn.Module) -> list[tuple[str, list[str]]]:
    """[(stage name, [module prefixes])] for the torchvision families; generic fallback for the rest."""
    name = arch.split(":", 1)[-1]
    if re.match(r"(resnet|resnext|wide_resnet)\d", name):
        return [("stem", ["conv1", "bn1"])] + [(f"layer{i}", [f"layer{i}"]) for i in range(1, 5)]
    if name.startswith("regnet_"):
        blocks = [n for n, _ in model.trunk_output.named_children()]
        return [("stem", ["stem"])] + [(b, [f"trunk_output.{b}"]) for b in blocks]
    if name.startswith("efficientnet_"):
        n = len(model.features)
        return ([("stem", ["features.0"])] + [(f"features.{i}", [f"features.{i}"]) for i in range(1, n - 1)]
                + [("head_conv", [f"features.{n - 1}"])])
    if name.startswith("mobilenet_v"):
        n = len(model.features)
        runs = _runs(model.features, 1, n - 1)
        last = [f"features.{n - 1}"]
        # MobileNetV3's classifier begins with a pretrained pre-logits Linear (576→1024): kept, in head_conv.
        if name.startswith("mobilenet_v3"):
            last.append("classifier.0")
        return ([("stem", ["features.0"])]
                + [(_span("features", r), [f"features.{i}" for i in r]) for r in runs]
                + [("head_conv", last)])
    if name.startswith("convnext_"):
        # features: 0 stem, then (stage, downsample) pairs; a downsample belongs to the stage it feeds (as in
        # timm), the final LayerNorm (classifier.0) to the last stage.
        return [("stem", ["features.0"]), ("features.1", ["features.1"]),
                ("features.2-3", ["features.2", "features.3"]),
                ("features.4-5", ["features.4", "features.5"]),
                ("features.6-7", ["features.6", "features.7", "classifier.0"])]
    if name.startswith("vgg"):
        # VGG as its users speak of it: five conv blocks cut at the max-pools, then fc6+fc7 ("top", when kept).
        blocks, current = [], []
        for i, layer in enumerate(model.features):
            current.append(f"features.{i}")
            if isinstance(layer, nn.MaxPool2d):
                blocks.append(current)
                current = []
        if current:
            blocks[-1] += current
        table = [(f"block{k + 1}", mods) for k, mods in enumerate(blocks)]
        if isinstance(getattr(model, "classifier", None), nn.Sequential):
            table.append(("top", ["classifier"]))
        return table
    if name == "inception_v3":
        # Inception v3 by its named blocks: the convolutional stem, then Mixed_5b ... Mixed_7c.
        children = [n for n, _ in model.named_children()]
        mixed = [n for n in children if n.startswith("Mixed_")]
        stem = [n for n in children if n.startswith("Conv2d_")]
        return [("stem", stem)] + [(n, [n]) for n in mixed]
    if name.startswith("vit_"):
        layers = [n for n, _ in model.encoder.layers.named_children()]
        blocks = [(n, [f"encoder.layers.{n}"]) for n in layers]
        blocks[-1][1].append("encoder.ln")
        return [("stem", ["conv_proj", "class_token", "encoder.pos_embedding"]), *blocks]
    return generic_table(model)


def generic_table(model: nn.Module) -> list[tuple[str, list[str]]]:
    """One stage per child of `features` (or per top-level child, with top-level Sequential/ModuleList
    containers opened up, e.g. MNASNet's `layers`, MaxViT's `blocks`) that holds parameters."""
    def has_params(m: nn.Module) -> bool:
        return any(True for _ in m.parameters())

    feats = getattr(model, "features", None)
    if isinstance(feats, nn.Sequential):
        children = [(f"features.{n}", m) for n, m in feats.named_children()]
    else:
        children = []
        for n, m in model.named_children():
            inner = [(f"{n}.{c}", cm) for c, cm in m.named_children() if has_params(cm)]
            if isinstance(m, (nn.Sequential, nn.ModuleList)) and len(inner) >= 3:
                children += inner
            else:
                children.append((n, m))
    table = [(n, [n]) for n, m in children if has_params(m)]
    if table:
        table[0] = ("stem", table[0][1])
    return table


def timm_groups(model: nn.Module) -> list[tuple[str, list[str]]] | None:
    """[(stage name, [tensor names])] from timm's coarse group matcher (timm's public `group_parameters`), or None
    where the model has none. Buffers (BatchNorm statistics) join the group of their module's parameters."""
    if not hasattr(model, "group_matcher"):
        return None
    from timm.models import group_parameters

    try:
        matcher = model.group_matcher(coarse=True)
    except NotImplementedError:
        return None
    groups = {gid: list(names) for gid, names in group_parameters(model, matcher).items()}
    by_module = {n.rpartition(".")[0]: gid for gid, names in groups.items() for n in names}
    first = min(groups) if groups else 0
    for name, _ in model.named_buffers():
        module = name.rpartition(".")[0]
        while module and module not in by_module:
            module = module.rpartition(".")[0]
        groups.setdefault(by_module.get(module, first), []).append(name)
    patterns = []  # (compiled regex, is the stem) in matcher order, to name groups by what matched
    if isinstance(matcher, dict):
        for key, spec in matcher.items():
            for pat in ([p for p, _ in spec] if isinstance(spec, (list, tuple)) else [spec] if spec else []):
                patterns.append((re.compile(pat), key == "stem"))
    return [(_group_name(groups[gid], patterns), groups[gid]) for gid in sorted(groups)]


def _group_name(members: list[str], patterns: list) -> str:
    """'blocks.3' (the text its regex matched), 'stem', 'blocks.6+conv_head+bn2' when timm merged layers into
    a group; for members no regex matches, their longest common module path."""
    parts: dict[str, None] = {}
    unmatched = []
    for m in members:
        for rx, is_stem in patterns:
            hit = rx.match(m)
            if hit:
                parts["stem" if is_stem else hit.group(0).rstrip(".")] = None
                break
        else:
            unmatched.append(m)
    if unmatched:
        parts[_common_path(unmatched)] = None
    return "+".join(parts)


def _common_path(members: list[str]) -> str:
    paths = [m.split(".")[:-1] for m in members]
    common = []
    for level in zip(*paths):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common) or "+".join(dict.fromkeys(m.split(".")[0] for m in members))


def backbone_stages(backbone: nn.Module, arch: str, prefix: str = "") -> list[Stage]:
    """The stages of `backbone` (built as `arch`, 'timm:...' or 'torchvision:...'); names get `prefix`."""
    params = dict(backbone.named_parameters())
    buffers = dict(backbone.named_buffers())
    names = list(params) + list(buffers)
    owner: dict[str, int] = {}
    stage_names: list[str] = []
    stage_modules: list[list[str]] = []
    groups = timm_groups(backbone) if arch.startswith("timm:") else None
    if groups is not None:
        for i, (sname, members) in enumerate(groups):
            stage_names.append(sname)
            stage_modules.append([])
            for m in members:
                owner[m] = i
    else:
        is_tv = arch.startswith("torchvision:")
        table = torchvision_table(arch, backbone) if is_tv else generic_table(backbone)
        for i, (sname, prefixes) in enumerate(table):
            stage_names.append(sname)
            stage_modules.append(prefixes)
            for n in names:
                if any(_under(n, p) for p in prefixes):
                    owner.setdefault(n, i)
        # Left-overs (a final norm outside the table, a pre-logits layer): to the stem if their top-level
        # module comes before the stem's in registration order, else to the last stage.
        order = {n: i for i, (n, _) in enumerate(backbone.named_children())}
        stem_top = min((order.get(p.split(".")[0], 0) for p in table[0][1]), default=0) if table else 0
        for n in names:
            if n not in owner and stage_names:
                owner[n] = 0 if order.get(n.split(".")[0], 1 << 30) < stem_top else len(stage_names) - 1
    if not stage_names:
        raise ValueError(f"{arch}: cannot split the backbone into stages (it has no parameters)")
    stages = [Stage(name=s, params=[], modules=[prefix + m for m in mods])
              for s, mods in zip(stage_names, stage_modules)]
    for n in names:
        if n not in owner:
            raise ValueError(f"{arch}: tensor {n} belongs to no stage")
        st = stages[owner[n]]
        if n in params:
            st.params.append(prefix + n)
            st.num_params += params[n].numel()
        else:
            st.buffers.append(prefix + n)
    # A table entry for a layer this variant lacks would be a no-op depth: drop it. A stage of only norm
    # parameters (timm's `head.norm`, densenet's `norm5`) is no unit of its own: it joins its neighbour.
    stages = [s for s in stages if s.params]
    def norm_only(st: Stage) -> bool:
        return all(params[n[len(prefix):]].ndim <= 1 for n in st.params)

    merged: list[Stage] = []
    for st in stages:
        if merged and norm_only(st):
            _merge_into(merged[-1], st, after=True)
        elif len(merged) == 1 and norm_only(merged[0]):  # a norm-only first stage joins the next one
            _merge_into(st, merged.pop(), after=False)
            merged.append(st)
        else:
            merged.append(st)
    _dedupe(merged)
    return merged


def _merge_into(dst: Stage, src: Stage, after: bool) -> None:
    dst.name = f"{dst.name}+{src.name}" if after else f"{src.name}+{dst.name}"
    dst.params = dst.params + src.params if after else src.params + dst.params
    dst.buffers = dst.buffers + src.buffers if after else src.buffers + dst.buffers
    dst.modules = dst.modules + src.modules if after else src.modules + dst.modules
    dst.num_params += src.num_params


def _dedupe(stages: list[Stage]) -> None:
    seen: dict[str, int] = {}
    for s in stages:
        if s.name in seen:
            seen[s.name] += 1
            s.name = f"{s.name}#{seen[s.name]}"
        else:
            seen[s.name] = 0
