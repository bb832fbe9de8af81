"""The reward model theta_r (DESIGN.md section 1): multimodal CTR predictor, Eq 14-21."""
