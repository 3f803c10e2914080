"""Pretrained backbones for fine-tuning: names, offline weights, stages, unfreeze depth, parameter groups.

Usage:
    from distrain.models import create_model, param_groups, list_backbones
    list_backbones("offline")                          # ['efficientnet_lite0', 'mobilenet_v2']
    model = create_model("efficientnet_lite0", num_classes=10, unfreeze_depth=2)
    model.info.input_size, model.info.mean              # 224, (0.5, 0.5, 0.5): what the data must match
    opt = torch.optim.AdamW(param_groups(model, lr=1e-3, weight_decay=0.05, layer_decay=0.75))

Modules: `registry` (names → built backbone + BackboneInfo), `offline` (ImageNet weights inside pip packages),
`weights` (files, URLs, hub downloads; strict loading), `stages` (the stage table), `classifier` (the model
with its head and unfreeze depth), `param_groups` (layer-wise lr decay).
"""

from distrain.models.classifier import Classifier, create_model, make_head
from distrain.models.errors import ModelError
from distrain.models.param_groups import param_groups
from distrain.models.registry import BackboneInfo, default_weights_source, list_backbones, resolve_name
from distrain.models.stages import Stage

__all__ = ["BackboneInfo", "Classifier", "ModelError", "Stage", "create_model", "default_weights_source",
           "list_backbones", "make_head", "param_groups", "resolve_name"]
