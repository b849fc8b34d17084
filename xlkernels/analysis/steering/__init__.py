"""Representation steering: saved plans (plan), CLAIM head shifts (shift), ITLC language vectors (itlc),
INCLINE alignment maps (incline), and the residual-stream injection they share (latent)."""
