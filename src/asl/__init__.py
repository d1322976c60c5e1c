"""ASL: Asymmetric Loss for multi-label classification."""
