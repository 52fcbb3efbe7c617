"""Loss functions: pure functions of tensors, each with unit tests of its math."""
