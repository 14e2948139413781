"""The one error type of fedseg.data: a data problem that a site's IT can act on."""


class DataValidationError(ValueError):
    """A site's data is unusable: says which site, which file, and what is wrong, in plain words.

    str(e) == "[site <site>] <file>: <problem>"; the three parts stay available as attributes.
    """

    def __init__(self, site: str, file: str, problem: str):
        self.site = str(site)
        self.file = str(file)
        self.problem = str(problem)
        super().__init__(f"[site {self.site}] {self.file}: {self.problem}")

    def __reduce__(self):
        # Keep the three-argument constructor working through pickle (multiprocessing, FLARE).
        return (type(self), (self.site, self.file, self.problem))
