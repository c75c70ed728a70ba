"""Triton code generation from the block-mask IR (to come)."""
