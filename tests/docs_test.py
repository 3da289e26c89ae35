"""Every relative link in README.md, docs/*.md and the dataset READMEs resolves inside
the repository: the file exists, and a #fragment names a heading of the linked file."""

import pathlib
import re
import tempfile

import tensorflow as tf

ROOT = pathlib.Path(__file__).resolve().parent.parent
# [text](target) and ![alt](target); the target ends at whitespace or ")".
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def _documents():
    return [
        ROOT / "README.md",
        *sorted((ROOT / "docs").glob("*.md")),
        *sorted((ROOT / "cgc_tf" / "data").glob("*/README.md")),
    ]


def _anchor(heading):
    """GitHub's id of a heading: lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path):
    text = _FENCE.sub("", path.read_text())
    return {_anchor(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*)$", text, re.M)}


def relative_links(path):
    """(target, line) of each relative link of a markdown file, code blocks excluded."""
    text = _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), path.read_text())
    links = []
    for number, line in enumerate(text.splitlines(), 1):
        for target in _LINK.findall(line):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, mailto:, ...
                links.append((target, number))
    return links


class DocsLinksTest(tf.test.TestCase):
    def test_every_relative_link_resolves_inside_the_repository(self):
        checked = 0
        for document in _documents():
            for target, line in relative_links(document):
                where = f"{document.relative_to(ROOT)}:{line}: {target}"
                file_part, _, fragment = target.partition("#")
                linked = (document.parent / file_part).resolve() if file_part else document
                self.assertTrue(linked.is_relative_to(ROOT), f"{where} leaves the repository")
                self.assertTrue(linked.exists(), f"{where} does not exist")
                if fragment and linked.suffix == ".md":
                    self.assertIn(fragment, _anchors(linked), f"{where}: no such heading")
                checked += 1
        self.assertGreater(checked, 20)

    def test_the_checker_sees_broken_links(self):
        # The checker itself: a missing file, an escape and a missing heading are found.
        path = pathlib.Path(tempfile.mkdtemp()) / "x.md"
        path.write_text(
            "# Title\n[a](missing.md) [b](#title) [c](#nope)\n"
            "[d](https://example.com) ![e](../x.png)\n```\n[f](in_code.md)\n```\n"
        )
        self.assertEqual(
            relative_links(path), [("missing.md", 2), ("#title", 2), ("#nope", 2), ("../x.png", 3)]
        )
        self.assertEqual(_anchors(path), {"title"})


if __name__ == "__main__":
    tf.test.main()
