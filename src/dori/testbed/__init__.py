"""The embedded memorizing text-to-image latent diffusion model (the testbed)."""
