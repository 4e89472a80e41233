"""Model zoos built from what ships in packages: real pretrained weights, real task data."""
