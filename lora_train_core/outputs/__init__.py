"""What a run leaves behind: the .safetensors file and its metadata, merges, samples, loss plots."""
