"""Training data: image folders, images, captions, aspect-ratio buckets, latent and text caches."""
