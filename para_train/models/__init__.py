"""ParaDiffusion models: LLM text encoder (+LoRA, +projection), UNet, frozen VAE. No distributed code here."""
