"""``make demo``: segment the cat in scikit-image's public-domain 'chelsea' photo.

Runs ``segany segment`` on the bundled default model and prints where it wrote the
mask and the overlay picture (under ``demo-output/``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from .cli import main as cli_main
from .images import write_image

OUTPUT = Path("demo-output")
CAT_CLICK = "160,140"  # on the cat's face, in pixels of the 451x300 photo
CAT_BOX = "60,20,420,300"


def main() -> int:
    try:
        from skimage import data
    except ImportError:
        print("the demo needs scikit-image: pip install 'segany[demo]'", file=sys.stderr)
        return 2
    image_path = write_image(OUTPUT / "chelsea.png", data.chelsea())
    print(f"image: {image_path}")
    return cli_main(
        [
            "segment",
            str(image_path),
            "--point",
            CAT_CLICK,
            "--box",
            CAT_BOX,
            "-o",
            str(OUTPUT / "chelsea-mask.png"),
            "--overlay",
            str(OUTPUT / "chelsea-overlay.png"),
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
