"""Site-side routines of each method, FLARE-free, and their registration on the site executor."""


def register_site_tasks(executor) -> None:
    """Add the FedSM and FedCross task handlers to a fedseg.fl.executor.SegExecutor."""
    from fedseg.fl import site_tasks

    site_tasks.register(executor)
