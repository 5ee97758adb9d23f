"""The model math, for any rank's slice: config, partition, weights, layers, decoder."""
