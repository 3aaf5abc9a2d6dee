"""How good a synthetic set is, before any classifier is trained on it: label fidelity, diversity, memorisation, FID/KID."""
