"""Sampling: noise schedules, samplers as functions over (model, x, sigmas), the denoiser and guidance."""
