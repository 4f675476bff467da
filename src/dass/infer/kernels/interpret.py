"""Two gaps of Triton's CPU interpreter (``TRITON_INTERPRET=1``), closed so the 2:4 kernels
can be checked on a machine without a GPU.

- bfloat16 is stored as uint16 in the interpreter and its ``tl.dot`` multiplies those
  integers; here bf16 operands are widened to fp32 first (exact: bf16 is a truncated fp32).
- With NumPy >= 2.4, ``int()`` of a one-element array raises, and the interpreter turns
  scalar kernel arguments used as loop bounds into such arrays.

Applied once by :func:`dass.infer.kernels._mods` when the interpreter is on; harmless
otherwise (it only wraps interpreter functions).
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["patch_interpreter"]


@functools.lru_cache(maxsize=None)
def patch_interpreter() -> bool:
    """Patch the interpreter in place; False when this triton's interpreter looks different."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter as it
    except Exception:
        return False
    ok = True
    builder = getattr(it, "InterpreterBuilder", None)
    orig_dot = getattr(builder, "create_dot", None)
    if orig_dot is not None and hasattr(it, "TensorHandle"):
        def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
            if a.dtype == tl.bfloat16 or b.dtype == tl.bfloat16:
                a = it.TensorHandle(_widen(a, tl), tl.float32)
                b = it.TensorHandle(_widen(b, tl), tl.float32)
            return orig_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

        builder.create_dot = create_dot
    else:
        ok = False
    orig_patch = getattr(it, "_patch_lang_tensor", None)
    if orig_patch is not None:
        def _patch_lang_tensor(tensor, scope):
            orig_patch(tensor, scope)
            tensor.__index__ = lambda self: int(np.asarray(self.handle.data).reshape(-1)[0])

        it._patch_lang_tensor = _patch_lang_tensor
    else:
        ok = False
    return ok


def _widen(h, tl) -> np.ndarray:
    """fp32 copy of an interpreter tensor (bf16 bits shifted into the high half: exact)."""
    if h.dtype == tl.bfloat16:
        return (h.data.astype(np.uint32) << 16).view(np.float32)
    return h.data.astype(np.float32)
