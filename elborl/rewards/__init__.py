"""Rewards: callables (images uint8 N x H x W x 3, prompt metadata) -> per-image rewards."""
