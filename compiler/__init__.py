"""The compiler: pattern IR, block classification and block-mask IR (to come)."""
