"""The fine-tuning model: a pretrained backbone cut into stages, a new head, and how deep training reaches.

Usage:
    from distrain.models import ModelSpec, create_model
    model = create_model(ModelSpec("efficientnet_lite0", classes=("cat", "dog"), unfreeze_depth=2))
    model = create_model("efficientnet_lite0", num_classes=10, unfreeze_depth=2)     # the same, without class names
    model.spec                        # the ModelSpec, preprocessing filled in: what checkpoints and model/ store
    model.stages                      # [Stage('stem', ...), ..., Stage('blocks.6+conv_head+bn2', ...)]
    model.apply_unfreeze(0)           # linear probe: head only
    model.train()                     # frozen stages stay in eval mode (BatchNorm statistics do not move)
    model.trainable_state_dict()      # head + trainable stages: what a checkpoint needs unless save_frozen

Freezing is decided before the DDP wrap: `apply_unfreeze` sets `requires_grad`, and DDP (with
find_unused_parameters=False) only registers parameters that require gradients, so frozen stages cost no
all-reduce traffic. A frozen stage is a fixed feature extractor, so it runs in eval mode for good: its
BatchNorm layers normalize with, and never update, their ImageNet statistics, and dropout / stochastic depth
inside it are off. Changing the depth after the DDP wrap needs a new wrap.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from distrain.models.errors import ModelError
from distrain.models.registry import BackboneInfo, build_backbone
from distrain.models.spec import ModelSpec, preprocessing
from distrain.models.stages import Stage, backbone_stages

Depth = int | str


ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


def make_head(num_features: int, num_classes: int, dropout: float = 0.2, hidden: int = 0,
              activation: str = "gelu") -> nn.Sequential:
    """Dropout + Linear, or with `hidden` > 0: Dropout + Linear + activation + Dropout + Linear (the seed's
    Dense 256 ReLU → Dropout 0.5 → Dense is hidden=256, activation=relu, dropout=0.5)."""
    if num_classes < 1:
        raise ModelError(f"num_classes must be at least 1, got {num_classes}")
    if not 0.0 <= dropout < 1.0:
        raise ModelError(f"dropout must be in [0, 1), got {dropout}")
    if activation not in ACTIVATIONS:
        raise ModelError(f"head activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    layers: list[nn.Module] = [nn.Dropout(dropout)]
    if hidden > 0:
        layers += [nn.Linear(num_features, hidden), ACTIVATIONS[activation](), nn.Dropout(dropout)]
        num_features = hidden
    layers.append(nn.Linear(num_features, num_classes))
    # Small logits at the start: the pretrained features are not yet mapped onto the new classes, and a large
    # random classifier would push big, noisy gradients into the stages being fine-tuned.
    nn.init.normal_(layers[-1].weight, std=0.01)
    nn.init.zeros_(layers[-1].bias)
    return nn.Sequential(*layers)


class Classifier(nn.Module):
    """backbone (pooled features) → head (logits), with stages and an unfreeze depth."""

    # Plain-Python attributes TorchScript should not try to compile (export traces or scripts forward only).
    __jit_ignored_attributes__: ClassVar[list[str]] = ["info", "spec", "stages", "unfreeze_depth",
                                                       "_frozen_modules", "_trainable_keys", "_touched_keys"]

    def __init__(self, backbone: nn.Module, info: BackboneInfo, num_classes: int, dropout: float = 0.2,
                 head_hidden: int = 0, dropped: list[str] | None = None, activation: str = "gelu",
                 flatten: bool = False, spec: ModelSpec | None = None):
        super().__init__()
        self.backbone = backbone
        # head_pool=flatten: the backbone gives its final feature map; Flatten() feeds all of it to the head.
        self.flatten = nn.Flatten(1) if flatten else nn.Identity()
        self.head = make_head(info.num_features, num_classes, dropout, head_hidden, activation)
        self.info = info
        self.spec = spec
        self.num_classes = num_classes
        self.dropped = list(dropped or [])
        self.stages: list[Stage] = backbone_stages(backbone, info.arch, prefix="backbone.")
        self.unfreeze_depth = len(self.stages)
        self._frozen_modules: list[str] = []
        self._trainable_keys: set[str] = set()
        self._touched_keys: set[str] = set()  # trainable at any depth applied since reset_touched(): what changed
        self.apply_unfreeze("all")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.backbone(x)))

    # --- freezing -------------------------------------------------------------------------------------------

    def resolve_depth(self, depth: Depth) -> int:
        n = len(self.stages)
        if isinstance(depth, str):
            text = depth.strip().lower()
            if text == "all":
                return n
            if not text.lstrip("-").isdigit():
                raise ModelError(f"unfreeze_depth {depth!r} is not a number or 'all' (valid: 0..{n} or 'all' "
                                 f"for {self.info.name})")
            depth = int(text)
        if isinstance(depth, bool) or not isinstance(depth, int) or not 0 <= depth <= n:
            raise ModelError(f"unfreeze_depth {depth!r} is out of range for {self.info.name}, which has {n} "
                             f"stages (valid: 0..{n} or 'all'; 0 = head only)")
        return depth

    def apply_unfreeze(self, depth: Depth) -> int:
        """Train the last `depth` stages and the head; freeze the rest. Returns the resolved depth."""
        k = self.resolve_depth(depth)
        n = len(self.stages)
        trainable = {name for s in self.stages[n - k:] for name in s.params + s.buffers}
        frozen = {name for s in self.stages[:n - k] for name in s.params + s.buffers}
        for name, p in self.named_parameters():
            p.requires_grad_(name not in frozen)
        head = {f"head.{key}" for key in self.head.state_dict()}
        self._trainable_keys = {key for key in self.state_dict() if key in trainable or key in head}
        self._touched_keys |= self._trainable_keys
        self._frozen_modules = _maximal_modules(self, frozen)
        self.unfreeze_depth = k
        if self.spec is not None:
            self.spec = self.spec.replace(unfreeze_depth=depth if depth == "all" else k)
        self.train(self.training)  # newly trainable modules take the model's mode, frozen ones stay in eval
        return k

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if mode:
            for name in self._frozen_modules:
                self.get_submodule(name).eval()
        return self

    def stage_trainable_params(self, depth: Depth) -> int:
        """Parameters that train at `depth` (head included), from the stage table; the model is unchanged."""
        k = self.resolve_depth(depth)
        head = sum(p.numel() for p in self.head.parameters())
        return head + sum(s.num_params for s in self.stages[len(self.stages) - k:])

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # --- checkpoints ----------------------------------------------------------------------------------------

    def reset_touched(self) -> None:
        """From now on, only tensors trainable at the current depth count as changed (see trainable_state_dict)."""
        self._touched_keys = set(self._trainable_keys)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers of the head and of every stage that was trainable since the model was built
        (a staged run that unfroze deeper and later froze again keeps what it trained); frozen ones come from the
        weights."""
        return {k: v for k, v in self.state_dict().items() if k in self._touched_keys}

    def load_trainable_state_dict(self, sd: dict[str, torch.Tensor], partial: bool = False) -> None:
        """Load a `trainable_state_dict` (or any subset of the full one). Strict on the keys it holds: unknown
        keys and other shapes fail; unless `partial`, every trainable key must be there too."""
        own = self.state_dict()
        unknown = [k for k in sd if k not in own]
        shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd
                  if k in own and sd[k].shape != own[k].shape]
        missing = [] if partial else sorted(k for k in self._trainable_keys - set(sd)
                                            if not k.endswith("num_batches_tracked"))
        if unknown or shapes or missing:
            parts = [f"{label}: {', '.join(items[:8])}{' ...' if len(items) > 8 else ''} ({len(items)})"
                     for label, items in (("unknown keys", unknown), ("shape mismatch", shapes),
                                          ("missing trainable keys", missing)) if items]
            raise ModelError(f"state dict does not fit {self.info.name} (unfreeze_depth "
                             f"{self.unfreeze_depth}, {self.num_classes} classes): " + "; ".join(parts))
        self.load_state_dict(sd, strict=False)

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay beyond 1-d ones: position embeddings and class tokens."""
        names = set()
        timm_nwd = getattr(self.backbone, "no_weight_decay", None)
        extra = set(timm_nwd()) if callable(timm_nwd) else set()
        for name, _ in self.backbone.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if name in extra or leaf in extra or leaf in _TOKEN_NAMES:
                names.add(f"backbone.{name}")
        return names

    def extra_repr(self) -> str:
        return (f"backbone={self.info.name}, classes={self.num_classes}, stages={len(self.stages)}, "
                f"unfreeze_depth={self.unfreeze_depth}")


_TOKEN_NAMES = {"class_token", "cls_token", "dist_token", "reg_token", "pos_embedding", "pos_embed",
                "absolute_pos_embed", "relative_position_bias_table"}


def _maximal_modules(root: nn.Module, frozen: set[str]) -> list[str]:
    """Names of the largest submodules whose tensors (params and buffers, recursively) are all in `frozen`."""
    out: list[str] = []

    def visit(module: nn.Module, name: str) -> None:
        tensors = [f"{name}.{n}" if name else n for n, _ in
                   list(module.named_parameters()) + list(module.named_buffers())]
        if not tensors:
            return
        if all(t in frozen for t in tensors):
            out.append(name)
            return
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(root, "")
    return [n for n in out if n]  # '' (the whole model) cannot be: the head always trains


def create_model(spec: ModelSpec | str, num_classes: int | None = None, weights: str = "default",
                 unfreeze_depth: Depth = "all", dropout: float = 0.2, head_hidden: int = 0) -> Classifier:
    """A Classifier built from a ModelSpec: the backbone with its weights, a new head for the spec's classes, the
    last `unfreeze_depth` stages trainable; `model.spec` is the spec with image size and preprocessing filled in.

    `create_model("mobilenet_v2", 10, ...)` is shorthand for a spec with classes '0'..'9'. See
    distrain.models.registry for names and weights."""
    if not isinstance(spec, ModelSpec):
        if num_classes is None:
            raise ModelError("create_model(name, num_classes, ...): num_classes is required with a backbone name")
        spec = ModelSpec(str(spec), classes=tuple(str(i) for i in range(num_classes)), weights=weights,
                         unfreeze_depth=unfreeze_depth, dropout=dropout, head_hidden=head_hidden)
    if spec.num_classes < 1:
        raise ModelError(f"num_classes must be at least 1, got {spec.num_classes}")
    built = build_backbone(spec.backbone, spec.weights, vgg_top=spec.vgg_top, head_pool=spec.head_pool,
                           image_size=spec.image_size)
    image_size = spec.image_size or built.info.input_size
    spec = spec.replace(image_size=int(image_size), preprocess=preprocessing(built.info, image_size))
    model = Classifier(built.backbone, built.info, spec.num_classes, dropout=spec.dropout,
                       head_hidden=spec.head_hidden, dropped=built.dropped, activation=spec.head_activation,
                       flatten=built.flatten, spec=spec)
    model.apply_unfreeze(spec.unfreeze_depth)
    model.reset_touched()
    return model
