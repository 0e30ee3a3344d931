"""The sparsify stage: Wanda / magnitude masks, DSnoT refinement, learned N:M (LBC), set layer by layer."""
