"""drorebel inside other training libraries.

* :mod:`drorebel.integrations.trl`: TRL trainers whose loss is one of drorebel's fused losses:
  ``DroRebelTRLTrainer`` (REBEL / χ² / KL / Wasserstein on pairs with rewards) and
  ``FusedDPOTrainer`` (TRL's sigmoid DPO on drorebel's fused log-probs). It needs TRL
  (``pip install drorebel[trl]``); importing this package does not.

This layer may import the losses and ops of drorebel, never the trainer; nothing in drorebel
imports it (``tests/test_layers.py``).
"""
