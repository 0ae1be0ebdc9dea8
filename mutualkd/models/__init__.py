"""The CIFAR model zoo of the distillation literature (RepDistiller's definitions), registered into timm.

Importing this package only registers the models, so ``timm.create_model('cifar_resnet32', num_classes=100)``
works like for any timm model. Every model also exposes the stage protocol of ``_common.StagedNet``:
``stem``, ``stages``, ``norm_pre`` with ``forward_features = norm_pre(stages(stem(x)))``.
The CIFAR VGGs are ``cifar_vgg8/11/13`` so that timm's own ``vgg11``/``vgg13`` stay untouched.
"""
from ._common import StagedNet  # noqa: F401  (base class of the stage protocol)
from .cifar_resnet import *  # noqa: F403  (each module's __all__: its registered models)
from .mobilenetv2 import *  # noqa: F403  (each module's __all__: its registered models)
from .shufflenet import *  # noqa: F403  (each module's __all__: its registered models)
from .vgg import *  # noqa: F403  (each module's __all__: its registered models)
from .wrn import *  # noqa: F403  (each module's __all__: its registered models)
