"""Analysis methods, one module per method (imported on use):
data (parallel corpus, text loading), align (MEXA, ANC), latent (residual-stream injection),
itlc (ITLC language vectors), incline (INCLINE alignment matrices), plots (shared figures), and the
head / neuron / shift modules."""
