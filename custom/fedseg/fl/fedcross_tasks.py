"""FedCross / FedCrossEns site tasks on the SegExecutor (cross_train, cross_validate)."""


def register(executor) -> None:
    """Adds the FedCross handlers to executor.handlers (implemented with the FedCross controller)."""
