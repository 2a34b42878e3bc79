"""Every sidebar shows at least two figures that book/figures.py makes, and links a notebook."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDEBARS = ROOT / "book" / "sidebars"


def test_each_sidebar_has_two_figures_made_by_code_and_a_notebook_link():
    made = set(re.findall(r'^\s*"(\w+)": \w+,$', (ROOT / "book" / "figures.py").read_text(), re.M))
    pages = sorted(SIDEBARS.glob("*.md"))
    assert len(pages) == 4
    for page in pages:
        text = page.read_text()
        images = re.findall(r"!\[[^\]]*\]\((figures/[\w.-]+\.png)\)", text)
        assert len(images) >= 2, f"{page.name}: {len(images)} figures"
        for image in images:
            assert (SIDEBARS / image).is_file(), (
                f"{page.name}: {image} is missing; run python book/figures.py"
            )
            assert Path(image).stem in made, f"{page.name}: {image} is not made by book/figures.py"
        notebooks = re.findall(r"\]\(\.\./notebooks/([\w-]+\.ipynb)\)", text)
        assert notebooks, f"{page.name}: no link to a notebook"
        for nb in notebooks:
            assert (ROOT / "notebooks" / nb).is_file(), f"{page.name}: links a missing notebook {nb}"
        assert not re.search(r"\bseeds?\b(?! \d)", text), f'{page.name}: internal word "seed"'
