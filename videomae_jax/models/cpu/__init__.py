"""XLA:CPU specialisations of the model's layers, selected per platform at lowering time.

The accelerator path (``models.layers``) is plain Linen/XLA code; these functions compute the
same values with custom VJPs tuned for XLA:CPU (bf16 matmuls it runs natively, a fused MLP
backward that recomputes the GELU). Checkpoint policies cannot look inside a ``custom_vjp``, so
``remat_policy`` applies to the plain path only.
"""
from videomae_jax.models.cpu.layers import gelu_erf, gelu_grad, linear, linear_bwd, mlp

__all__ = ["linear", "linear_bwd", "mlp", "gelu_erf", "gelu_grad"]
