"""Image captioning with a ResNet-50 encoder, a causal BERT fusion decoder and a heatmap per word."""
