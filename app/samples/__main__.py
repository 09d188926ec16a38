"""`python -m app.samples [NAME]`: print where the sample image lies (cells.png unless NAME is given)."""

import sys

from app.samples import path

try:
    print(path(*sys.argv[1:2]))
except FileNotFoundError as exc:
    raise SystemExit(f"app.samples: {exc}") from None
