"""Registers each method's site task handlers on the SegExecutor (FedSM, FedCross)."""


def register(executor) -> None:
    from fedseg.fl import fedcross_tasks, fedsm_tasks

    fedsm_tasks.register(executor)
    fedcross_tasks.register(executor)
