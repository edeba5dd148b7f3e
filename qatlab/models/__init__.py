"""Model registry (timm-style): ``create(name, num_classes, input_shape, **kwargs)``.

Every model uses plain ``nn.Conv1d``/``nn.Conv2d``/``nn.Linear`` for its weights (so
:func:`qatlab.quantize` can swap them) and registers them in execution order (stem first,
classifier last). Conv models pick 1-D or 2-D layers from the input shape.
"""

from qatlab.models import mlp, mobilenetv2, resnet, vit  # noqa: F401  (registers the models)
from qatlab.models.registry import create, list_models, register

__all__ = ["create", "list_models", "register"]
