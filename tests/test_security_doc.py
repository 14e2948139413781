"""docs/deployment.md's Security model lists exactly the classes the allow-list allows, and what is still open."""

from __future__ import annotations

from conftest import REPO

from fedseg.fl import allowlist


def _doc_block(text: str, heading: str) -> list[str]:
    """The class paths of the first code block after `heading` in docs/deployment.md."""
    block = text.split(heading, 1)[1].split("```", 2)[1]
    return [line.split()[0] for line in block.splitlines() if line.strip()]


def test_deployment_doc_lists_exactly_what_is_allowed():
    text = (REPO / "docs" / "deployment.md").read_text()
    section = text.split("### What a job can instantiate at a site", 1)[1]
    assert _doc_block(section, "A site (a hospital's kit):") == list(allowlist.SITE_CLASSES)
    assert _doc_block(section, "The server:") == list(allowlist.SERVER_CLASSES)
    assert "only the seven classes" not in text
    open_part = text.split("### What is still open", 1)[1]
    for weakness in ("Updates within the bounds", "second moments", "first visit", "differential privacy"):
        assert weakness in open_part, weakness
