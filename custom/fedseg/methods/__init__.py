"""Site-side routines of each method (FedSM, FedCross) on the engine; no FLARE."""
