"""Generalisation experiments (SPEC.md section 8): out-of-distribution prompts (ood.py) and
unseen experts (unseen.py), as pure functions over a routing table and its embeddings."""
