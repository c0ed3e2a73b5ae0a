"""Sparse upcycling on real text with `upcycle_fx` (issue 6).

Modules: `data` (the corpus), `model` (the dense decoder, its upcycled variants, FLOPs),
`precision` (bf16 weights with float32 master copies), `train` (the training loop and the
pretraining command), `arms` (continuing one checkpoint several ways), `compare`, `ablations`,
`minilm` (the real checkpoint), `plots`, `plan` (time budget) and `run_all` (everything).
"""
