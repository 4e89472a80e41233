"""The real CLIP path: zero-shot heads from an open_clip text tower, the papers' task data, and a
``clip`` zoo that runs the whole pipeline on a paper preset's checkpoints (internet and a GPU advised)."""
