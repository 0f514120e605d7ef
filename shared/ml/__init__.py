"""Face preprocessing, the regional CNNs, training, inference and the model registry."""
