"""Training, evaluation and inference on top of ``deeplab.models`` and ``deeplab.data``.

Modules: ``config`` (YAML -> typed dataclasses), ``train`` (the paper's training protocol, one
process or many), ``checkpoint``, ``lr_schedule`` (poly), ``losses`` (the MSC cross-entropy),
``distributed`` (torchrun helpers), ``metrics`` (confusion matrix, mIoU), ``inference``,
``evaluate`` and ``segment``. Import the module you need: this package imports nothing eagerly
so that ``import deeplab.engine.metrics`` stays light.
"""

from __future__ import annotations
