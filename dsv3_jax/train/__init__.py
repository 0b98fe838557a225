"""Training: the loop (`train_and_evaluate`), optimizer, losses, checkpoints and metrics.

Command line: `python -m dsv3_jax.train --config=configs/tiny.py --workdir=runs/tiny`.
"""
