"""The shipped pattern library: one .attn file per family."""
