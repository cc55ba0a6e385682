"""Training a model on stored features: what `viclip train` runs.

  batches        every caption of a split, tokenised and padded once, and each rank's share of a batch
  optimisation   AdamW, its schedule, clipping and the gradient scaler
  cross_entropy  the teacher-forced objective, and its epoch loops
  scst           the self-critical objective, rewarded by CIDEr-D
  cider          fast CIDEr-D against a fixed corpus: SCST's reward
  checkpoint     the seeds, and the resume state saved after each epoch
"""
