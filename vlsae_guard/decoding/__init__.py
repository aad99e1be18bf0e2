"""Decoding with two arms: arm *a* is the model as asked, arm *b* a counterfactual of it; each
step fuses their next-token logits and picks one token that both arms then see."""
