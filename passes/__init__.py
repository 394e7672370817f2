"""torch.fx analysis and rewrite passes (installed as ``revcompile.passes``)."""
