//! Not yet implemented: trainer and stage recipes (work in progress).
