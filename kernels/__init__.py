"""CUDA sources shipped with tinylm (see tinylm.cuda)."""
