"""Stand-in for the parts of torchvision that segment-anything imports (tests only)."""
