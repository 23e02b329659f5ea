"""Progress bars: whether tqdm should draw one (a leaf the training loop and the evaluation both read)."""
from __future__ import annotations

import os
from typing import Optional


def progress_disabled() -> Optional[bool]:
    """Return tqdm's `disable`: True under TQDM_DISABLE (tqdm.notebook ignores the variable), else None
    (tqdm's own rule: no bar when the output is not a terminal)."""
    return True if os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false") else None
