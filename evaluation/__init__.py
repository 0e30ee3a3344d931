"""The eval stage: every model artifact of a run measured side by side (accuracy, perplexity, size)."""
