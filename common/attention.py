"""Attention students (target 'attn'). Filled in by the attention-students work (issue 6)."""
