"""Training objectives: modules that hold the model being trained together with the state only
training needs (momentum copies, feature queues) and compute the losses.

``objectives.pretrain.PretrainObjective``: ALBEF-style pre-training (SRCL / InfoNCE contrastive
loss against a momentum model and queue, ITM with hard negatives, MLM); retrieval fine-tuning
uses it with MLM off.
"""
