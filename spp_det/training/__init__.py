"""What the training stages share: the resumable step loop (``loop``), window labelling and
mini-batch sampling (``sampling``), each stage's per-image window sets (``windows``) and
pretraining's classification crops (``crops``)."""
