"""Pure torch functions, one implementation for every device. Tensors in, tensors out; no IO, no host syncs
unless marked `# sync`."""
