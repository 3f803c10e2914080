"""Pretrained backbones for fine-tuning: names, offline weights, stages, unfreeze depth, parameter groups.

Usage:
    from distrain.models import ModelSpec, create_model, param_groups, list_backbones
    list_backbones("offline")                          # ['efficientnet_lite0', 'mobilenet_v2']
    model = create_model(ModelSpec("efficientnet_lite0", classes=tuple("abc"), unfreeze_depth=2))
    model.spec.preprocess                              # image size, mean/std, crop_pct: what the data must match
    opt = torch.optim.AdamW(param_groups(model, lr=1e-3, weight_decay=0.05, layer_decay=0.75))

Modules: `spec` (the model's identity: ModelSpec), `registry` (names → built backbone + BackboneInfo), `offline`
(ImageNet weights inside pip packages), `weights` (files, URLs, hub downloads; strict loading), `stages` (the stage
table), `classifier` (the model with its head and unfreeze depth), `param_groups` (layer-wise lr decay), `folder`
(the model/ folder a run leaves: spec + weights).
"""

from distrain.models.availability import check_weights, default_weights_source
from distrain.models.classifier import Classifier, create_model, make_head
from distrain.models.errors import ModelError
from distrain.models.param_groups import param_groups
from distrain.models.registry import BackboneInfo, list_backbones, resolve_name
from distrain.models.spec import ModelSpec
from distrain.models.stages import Stage

__all__ = ["BackboneInfo", "Classifier", "ModelError", "ModelSpec", "Stage", "check_weights", "create_model",
           "default_weights_source", "list_backbones", "make_head", "param_groups", "resolve_name"]
