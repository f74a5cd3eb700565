"""Optional libraries' internals alignkit calls (row L1 of the table in docs/architecture.md)."""

from __future__ import annotations

import importlib.util
import inspect

import pytest

from .guards import check, guard

LIGER = "liger_kernel"


@pytest.mark.skipif(importlib.util.find_spec(LIGER) is None,
                    reason="liger-kernel is not installed (optional, CUDA only): model.kernels=liger is refused "
                           "with a one-line error before anything is built")
def test_liger_private_instance_patch():
    """`model.kernels: liger` calls liger's private `_apply_liger_kernel_to_instance(model=, rope=, rms_norm=,
    swiglu=, cross_entropy=, fused_linear_cross_entropy=)` and reads `monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN`."""
    where = "alignkit/models/efficiency.py:apply_kernels"
    with guard(LIGER, "liger_kernel.transformers._apply_liger_kernel_to_instance / MODEL_TYPE_TO_APPLY_LIGER_FN moved",
               where):
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    check("llama" in MODEL_TYPE_TO_APPLY_LIGER_FN and "qwen2" in MODEL_TYPE_TO_APPLY_LIGER_FN, LIGER,
          "MODEL_TYPE_TO_APPLY_LIGER_FN no longer maps llama / qwen2", where)
    check("model" in inspect.signature(_apply_liger_kernel_to_instance).parameters, LIGER,
          "_apply_liger_kernel_to_instance no longer takes model=", where)
    from alignkit.models.efficiency import LIGER_OPTIONS

    fn = MODEL_TYPE_TO_APPLY_LIGER_FN["llama"]
    names = set(inspect.signature(fn).parameters)
    check(set(LIGER_OPTIONS) <= names, LIGER, f"liger's llama patch lost option(s) {sorted(set(LIGER_OPTIONS) - names)}",
          where)
