"""``python -m gemvlab.stages <stage> [overrides]``: run one stage of a registered runner.

The stage name picks the runners (gemvlab.registry); the resolved config picks the one among
them (e.g. ``bench.kind``). Knows no paper: method families register their own runners.
"""

from __future__ import annotations

import sys

from gemvlab.error_line import say
from gemvlab.registry import stages
from gemvlab.stage import dispatch, stage


def main() -> None:
    known = stages()
    name = sys.argv[1] if len(sys.argv) > 1 else ""
    if name not in known:
        say(f"gemvlab: error: {'stage ' + repr(name) + ' is unknown' if name else 'no stage'}"
            f": use python -m gemvlab.stages <stage> [overrides], stage one of "
            f"{', '.join(known)}")
        sys.exit(2)
    del sys.argv[1]
    stage(name)(dispatch(name))()


if __name__ == "__main__":
    main()
