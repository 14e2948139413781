"""FLARE-side adapters of the methods' site routines (filled by the FedSM and FedCross work)."""


def register(executor) -> None:
    return None
