"""Which sites take part, round by round: the bookkeeping of failures, drops, rejoins and absences (no FLARE).

* FailedRounds (FedAvg, FedSM): rounds in a row with fewer valid updates than min_clients; too many stop the job.
* SiteHealth (FedCross): communications in a row in which a site failed a task; too many leave the site out
  for a while, then it is tried again.
* plan_round (FedSM): the selector's class sites connected now, the connected sites that are no class, and the
  class sites not connected.
"""

from __future__ import annotations


class FailedRounds:
    """Consecutive rounds that left the models unchanged (fewer valid updates than min_clients)."""

    def __init__(self, limit: int):
        self.limit = int(limit)
        self.count = 0

    def failed(self) -> bool:
        """Count one more failed round; True when the job must stop (``limit`` of them in a row)."""
        self.count += 1
        return self.count >= self.limit

    def succeeded(self) -> None:
        self.count = 0


class SiteHealth:
    """Which sites FedCross leaves out: consecutive failed communications, drops and rejoins.

    Per communication: start() (returns the sites due back), then failed() / tasked() for each task, then
    finish() (resets the count of every site whose tasks all succeeded; returns those that recovered)."""

    def __init__(self, max_failures: int, rejoin_after: int):
        self.max_failures = int(max_failures)
        self.rejoin_after = int(rejoin_after)
        self.failures: dict[str, int] = {}  # failed communications in a row
        self.dropped_at: dict[str, int] = {}  # left-out site -> communication in which it was left out
        self._failed: set[str] = set()
        self._tasked: set[str] = set()

    @property
    def dropped(self) -> list[str]:
        return list(self.dropped_at)

    def start(self, c: int, connected: list[str]) -> list[str]:
        """Begin communication c; left-out sites whose rejoin_after communications are over and that are
        connected come back, one failure away from being left out again."""
        self._failed, self._tasked = set(), set()
        back = [s for s, at in self.dropped_at.items() if c - at > self.rejoin_after and s in connected]
        for site in back:
            del self.dropped_at[site]
            self.failures[site] = self.max_failures - 1
        return back

    def tasked(self, sites) -> None:
        self._tasked.update(sites)

    def failed(self, site: str, c: int, validation: bool = False) -> bool:
        """Count a failure of site in communication c (once per communication); True if it is left out now.
        A failure that is only a missed validation needs at least 2 in a row."""
        self._tasked.add(site)
        if site in self._failed:
            return False
        self._failed.add(site)
        self.failures[site] = self.failures.get(site, 0) + 1
        limit = max(self.max_failures, 2) if validation else self.max_failures
        if self.failures[site] >= limit and site not in self.dropped_at:
            self.dropped_at[site] = c
            return True
        return False

    def failed_now(self, site: str) -> bool:
        return site in self._failed

    def finish(self) -> list[str]:
        ok = self._tasked - self._failed
        recovered = sorted(s for s in ok if self.failures.get(s))
        for site in ok:
            self.failures[site] = 0
        return recovered

    def state(self) -> dict:
        return {"site_failures": dict(self.failures), "dropped_at": dict(self.dropped_at)}

    def restore(self, info: dict) -> None:
        """From a checkpoint's info (older checkpoints list only dropped_sites: left out at their communication)."""
        self.failures = {str(s): int(n) for s, n in (info.get("site_failures") or {}).items()}
        dropped_at = info.get("dropped_at")
        if dropped_at is None:
            dropped_at = {s: int(info.get("communication", 0)) for s in info.get("dropped_sites", [])}
        self.dropped_at = {str(s): int(c) for s, c in dropped_at.items()}


def plan_round(classes: list[str], connected: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(class sites connected now, in class order; connected sites that are no selector class; class sites
    not connected now)."""
    members = [s for s in classes if s in connected]
    outsiders = sorted(s for s in connected if s not in classes)
    missing = [s for s in classes if s not in connected]
    return members, outsiders, missing
