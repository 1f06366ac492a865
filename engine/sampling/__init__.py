"""Sampling: noise schedules, samplers as functions over (model, x, sigmas), the denoiser and guidance.

model_sampling  the discrete sigma table, eps / v parameterisation, latent scale factors, the denoiser wrapper
schedules       ComfyUI's schedulers in one name -> function table, and the closed-form schedules
samplers        ComfyUI's samplers in one name -> function table, with their shared step fragments
guidance        conditioning entries and classifier-free guidance, batched as ComfyUI batches them
ksampler        the KSampler algorithm: seeded noise, schedule, noising, guided sampling, latent scaling
"""
