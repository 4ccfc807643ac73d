//! Not yet implemented: LoRA, freeze/full, value head (work in progress).
