"""Optimizer parameter groups: layer-wise learning-rate decay by stage, no weight decay on norms and biases.

Usage:
    from distrain.models import create_model, param_groups
    model = create_model("efficientnet_lite0", 10, unfreeze_depth=2)
    groups = param_groups(model, lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    opt = torch.optim.AdamW(groups)          # each group: params, lr, weight_decay, name, lr_scale
    for g in opt.param_groups:               # a schedule scales each group by its lr_scale
        g["lr"] = schedule(step) * g["lr_scale"]

The head learns at `lr`; stage i of n (the last stage has distance d = 1 from the head, the stem d = n) at
lr × layer_decay^d: layers near the input hold generic features that need the least change (the rule used by
BEiT/timm layer decay and ULMFiT's discriminative fine-tuning). Parameters with one dimension or fewer (norm
scales and shifts, biases) and position embeddings / class tokens get no weight decay: shrinking them towards
zero does not regularize, it shifts the features. Frozen parameters are in no group.
"""

from __future__ import annotations

from torch import nn

from distrain.models.errors import ModelError


def _unwrap(model: nn.Module) -> nn.Module:
    """The Classifier inside a DDP / torch.compile wrapper."""
    while not hasattr(model, "stages"):
        inner = getattr(model, "module", None)
        inner = getattr(model, "_orig_mod", None) if inner is None else inner
        if not isinstance(inner, nn.Module):
            raise ModelError(f"param_groups needs a distrain Classifier (from create_model), got "
                             f"{type(model).__name__}")
        model = inner
    return model


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0,
                 layer_decay: float = 1.0) -> list[dict]:
    """Torch optimizer groups with keys params, lr, weight_decay, name ('head', 'stage.<name>', each also as
    '<name>.no_wd') and lr_scale. Head first, then stages from the last to the stem; no empty groups."""
    if not 0.0 <= layer_decay <= 1.0:
        raise ModelError(f"layer_decay must be in [0, 1], got {layer_decay}")
    clf = _unwrap(model)
    named = dict(clf.named_parameters())
    skip_wd = clf.no_weight_decay()
    n = len(clf.stages)
    units = [("head", [f"head.{k}" for k, _ in clf.head.named_parameters()], 1.0)]
    for i in reversed(range(n)):  # distance from the head: the last stage 1, the stem n
        units.append((f"stage.{clf.stages[i].name}", clf.stages[i].params, layer_decay ** (n - i)))
    groups = []
    for name, names, scale in units:
        params = [(k, named[k]) for k in names if named[k].requires_grad]
        decay = [p for k, p in params if p.ndim > 1 and k not in skip_wd]
        no_decay = [p for k, p in params if p.ndim <= 1 or k in skip_wd]
        for suffix, ps, wd in (("", decay, weight_decay), (".no_wd", no_decay, 0.0)):
            if ps:
                groups.append({"params": ps, "lr": lr * scale, "weight_decay": wd, "name": name + suffix,
                               "lr_scale": scale})
    return groups
