"""The sparsify stage's recipe section."""
from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from compress.calibration import CalibrationConfig
from launch.schema_base import OneWorkerStage, Strict


class DSnoTConfig(Strict):
    max_cycle: int = Field(50, ge=0, description="Most grow/prune swaps per output row (0: the initial mask "
                                                  "unchanged).")
    reference_width: int | None = Field(
        4096, ge=1, description="Layers narrower than this get max_cycle scaled by in_features / reference_width, "
                                "rounded up (50 swaps on a 128-column row rewrite most of it); null: max_cycle "
                                "for every layer.")
    update_threshold: float = Field(
        0.1, ge=0, description="A row stops once |E[ε]| falls to this, in the DSnoT authors' units: E[x] summed "
                               "over a `threshold_tokens`-token sequence. The stage uses plain means, so it "
                               "compares |E[ε]| with update_threshold / threshold_tokens.")
    threshold_tokens: int = Field(2048, ge=1, description="The sequence length that update_threshold's units sum "
                                                          "over (2048 in the authors' code).")
    gamma: float = Field(1.0, ge=0, description="Exponent of Var(x_r) dividing the grow criterion.")
    refine_mlp: bool = Field(False, description="Also refine MLP projections; by default only the attention "
                                                "projections (Linear layers under a module whose name holds "
                                                "`attn` or `attention`: q/k/v/o) are refined.")

    def cycles(self, in_features: int) -> int:
        if self.reference_width is None or in_features >= self.reference_width:
            return self.max_cycle
        return math.ceil(self.max_cycle * in_features / self.reference_width)

    @property
    def threshold(self) -> float:
        """update_threshold in plain-mean units."""
        return self.update_threshold / self.threshold_tokens


class SparsifyStage(OneWorkerStage):
    """Prune every Linear layer of the decoder layers (not embeddings or the LM head), layer by layer,
    each calibrated on the outputs of the already-pruned layers before it."""
    kind: Literal["sparsify"] = "sparsify"
    method: Literal["wanda", "magnitude"] = Field(
        "wanda", description="Initial mask: `wanda` keeps the highest |W_ij|·‖X_j‖₂ (calibration activations), "
                             "`magnitude` the highest |W_ij|.")
    sparsity: float | None = Field(None, ge=0, lt=1, description="Unstructured: the fraction of each output row "
                                                                 "pruned. Give this or n_m.")
    n_m: tuple[int, int] | None = Field(None, description="N:M: keep N of every M consecutive input weights, e.g. "
                                                          "[2, 4]. Give this or sparsity.")
    dsnot: DSnoTConfig | None = Field(None, description="Refine the initial mask with DSnoT (weight swaps that "
                                                        "cancel each row's expected output shift); null: off.")
    calibration: CalibrationConfig = Field(CalibrationConfig(), description="Calibration sequences.")

    @model_validator(mode="after")
    def _one_pattern(self):
        if (self.sparsity is None) == (self.n_m is None):
            raise ValueError("give exactly one of `sparsity` (unstructured) and `n_m` (N:M, e.g. [2, 4])")
        if self.n_m is not None and not 0 < self.n_m[0] < self.n_m[1]:
            raise ValueError(f"n_m must be [N, M] with 0 < N < M, got {list(self.n_m)}")
        return self
