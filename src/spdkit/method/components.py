"""Rank-one subcomponents of one weight matrix, per module kind.

A module's weight W [d_out, d_in] is approximated by Σ_c U[:, c] V[c, :] (paper eq. 1). The
masked forward never builds a per-sample weight: it computes the inner activations
h = a @ Vᵀ [..., C], scales them by the mask, and maps back with Uᵀ. Supporting a new module kind
means writing one subclass of `Components` and registering it: nn.Linear, nn.Embedding and
Hugging Face's GPT-2 `Conv1D` are here. `weight()` and `target_weight()` are always the
[d_out, d_in] matrix U @ V approximates, whatever the module's own storage layout.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Components(nn.Module):
    """V [C, d_in] and U [d_out, C] for one module; the module's bias stays frozen."""

    def __init__(self, d_in: int, d_out: int, C: int, bias: Tensor | None) -> None:
        super().__init__()
        self.C, self.d_in, self.d_out = C, d_in, d_out
        # "normal" init: V ~ N(0, 1/d_in) keeps h = a @ Vᵀ at the scale of a; U ~ N(0, 1/C)
        # keeps U h at that scale too. `init_from_target` replaces it (the default).
        self.V = nn.Parameter(torch.randn(C, d_in) / math.sqrt(d_in))
        self.U = nn.Parameter(torch.randn(d_out, C) / math.sqrt(C))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def restrict_to_blocks(self, n: int, axis: Literal["out", "in"]) -> None:
        """Split W [d_out, d_in] into n equal blocks of rows (axis "out") or of columns ("in"):
        subcomponent c belongs to block b = c // (C / n), and U[:, c] (rows) or V[c, :]
        (columns) is zero outside block b, now and after every update.

        Why: a rank-one piece of an attention matrix may otherwise mix the heads (q, k, v
        along their rows, o along its columns), so no set of pieces is one head; with a
        block per head each piece lives in one head and removing a head's pieces removes
        that head only. The zeros are kept by masking the parameter's gradient (a tensor
        hook), so AdamW's moments and update stay zero there (and decay keeps a zero at zero):
        the same as decomposing each block as a module of its own, with one U, V per matrix.
        `.to(device / dtype)` keeps the hook; a deepcopy, or torch's swap-on-conversion
        mode, does not: build the model from its config instead (as runs and resumes do)."""
        size = self.d_out if axis == "out" else self.d_in
        if n == 1:
            return
        if size % n or self.C % n:
            raise ValueError(
                f"cannot split {size} {'rows' if axis == 'out' else 'columns'} and C {self.C} "
                f"into {n} equal blocks"
            )
        # block_of_row[i] == block_of_piece[c]: [size, C]
        same = (torch.arange(size) // (size // n))[:, None] == (
            torch.arange(self.C) // (self.C // n)
        )[None, :]
        param, support = (self.U, same) if axis == "out" else (self.V, same.T)
        self.register_buffer("block_support", support.to(param.dtype), persistent=False)
        self.block_axis = axis
        with torch.no_grad():
            param.mul_(self.block_support)
        param.register_hook(self._mask_block_gradient)

    def _mask_block_gradient(self, grad: Tensor) -> Tensor:
        return grad * self.block_support

    def _blocked(self, param: Tensor, which: str) -> Tensor:
        """`param` with the block structure applied, if `which` ("U" / "V") is the blocked one."""
        support = getattr(self, "block_support", None)
        if support is None or which != ("U" if self.block_axis == "out" else "V"):
            return param
        return param * support

    @torch.no_grad()
    def init_from_target(self, W: Tensor) -> None:
        """Random unit directions u_c, v_c, each rank-one term scaled by its overlap with W:
        U_c V_cᵀ = ⟨u_c v_cᵀ, W⟩_F u_c v_cᵀ. The sum starts as a noisy multiple of W instead of
        an unrelated matrix of W's size; in short TMS runs this avoided the local minimum where
        one subcomponent serves two features through opposite signs of V (README). With
        blocks (`restrict_to_blocks`), each direction is drawn within its piece's block."""
        W = W.detach().to(self.U.dtype)
        U = self._blocked(torch.randn_like(self.U), "U")
        V = self._blocked(torch.randn_like(self.V), "V")
        self.U.copy_(torch.nn.functional.normalize(U, dim=0))
        self.V.copy_(torch.nn.functional.normalize(V, dim=1))
        # ⟨u_c v_cᵀ, W⟩_F = Σ_i (Uᵀ W)[c, i] V[c, i]: one matmul, never the [d_out, C, d_in]
        # product a three-operand einsum may build
        overlap = ((self.U.T @ W) * self.V).sum(1)  # [C]
        self.U.mul_(overlap)

    def inner(self, x: Tensor) -> Tensor:
        """Inner activations h [..., C] = a @ Vᵀ (the input of the CI functions)."""
        raise NotImplementedError

    def outer(self, h_masked: Tensor) -> Tensor:
        """Module output from masked inner activations [..., C]."""
        raise NotImplementedError

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """The masked module: ((x @ Vᵀ) * mask) @ Uᵀ (+ bias). mask broadcasts over [..., C]."""
        return self.outer(self.inner(x) * mask)

    def weight(self) -> Tensor:
        """Σ_c U_c V_cᵀ = U @ V [d_out, d_in] (the module's map as a matrix acting on columns)."""
        return self.U @ self.V

    @staticmethod
    def target_weight(module: nn.Module) -> Tensor:
        """The target module's weight as the same [d_out, d_in] matrix that `weight()` gives."""
        raise NotImplementedError


class LinearComponents(Components):
    """nn.Linear: W [d_out, d_in], y = x Wᵀ + b."""

    @classmethod
    def from_module(cls, module: nn.Linear, C: int) -> LinearComponents:
        return cls(module.in_features, module.out_features, C, module.bias)

    def inner(self, x: Tensor) -> Tensor:
        return x @ self.V.T

    def outer(self, h_masked: Tensor) -> Tensor:
        y = h_masked @ self.U.T
        return y if self.bias is None else y + self.bias

    @staticmethod
    def target_weight(module: nn.Module) -> Tensor:
        return module.weight


class EmbeddingComponents(Components):
    """nn.Embedding as the linear map one-hot(token) [vocab] → [d_model]: W = weightᵀ
    [d_model, vocab], so V [C, vocab] and U [d_model, C]. The inner activation of token t is the
    column V[:, t], a row lookup of Vᵀ: no one-hot vector or matmul over the vocabulary."""

    @classmethod
    def from_module(cls, module: nn.Embedding, C: int) -> EmbeddingComponents:
        if module.max_norm is not None:
            raise ValueError(
                "cannot decompose an nn.Embedding with max_norm (it renormalises rows in place)"
            )
        return cls(module.num_embeddings, module.embedding_dim, C, None)

    def inner(self, x: Tensor) -> Tensor:
        if x.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"an embedding's input must be token ids (int), got {x.dtype}")
        return F.embedding(x, self.V.T)  # [..., C]

    def outer(self, h_masked: Tensor) -> Tensor:
        return h_masked @ self.U.T

    @staticmethod
    def target_weight(module: nn.Module) -> Tensor:
        return module.weight.T


class Conv1DComponents(LinearComponents):
    """Hugging Face GPT-2 `Conv1D`: y = x W + b with W [d_in, d_out] (transposed with respect to
    nn.Linear), so the matrix is Wᵀ [d_out, d_in]; the masked forward is nn.Linear's."""

    @classmethod
    def from_module(cls, module: nn.Module, C: int) -> Conv1DComponents:
        d_in, d_out = module.weight.shape
        return cls(d_in, d_out, C, module.bias)

    @staticmethod
    def target_weight(module: nn.Module) -> Tensor:
        return module.weight.T


COMPONENT_CLASSES: dict[type[nn.Module], type[Components]] = {
    nn.Linear: LinearComponents,
    nn.Embedding: EmbeddingComponents,
}


def _components_class(module: nn.Module) -> type[Components] | None:
    """Registered class for the module's exact type; HF `Conv1D` is recognised by name so
    that spdkit does not import transformers."""
    cls = COMPONENT_CLASSES.get(type(module))
    if cls is None and type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        cls = Conv1DComponents
    return cls


def is_decomposable(module: nn.Module) -> bool:
    return _components_class(module) is not None


def make_components(module: nn.Module, C: int) -> Components:
    """The Components subclass registered for this module's type."""
    cls = _components_class(module)
    if cls is None:
        kinds = ", ".join([k.__name__ for k in COMPONENT_CLASSES] + ["transformers Conv1D"])
        raise ValueError(f"cannot decompose a {type(module).__name__} (decomposable: {kinds})")
    return cls.from_module(module, C)
