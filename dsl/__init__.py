"""The dsl: grammar, AST, checker and formatter of the .attn language."""
