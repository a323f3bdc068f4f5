# Where Snakemake's own messages fall short, lines of ours (gemvlab.snakemake_hints,
# gemvlab.error_line): a job's error on the terminal even when its log cannot be written, the
# truth about a lock, and a run stopped by a signal told apart from a failed job.
import sys
from pathlib import Path

from gemvlab.error_line import SHELL_PREFIX
from gemvlab.snakemake_hints import lock_hint, note_signals, stop_hint

shell.prefix(SHELL_PREFIX)

# Before Snakemake takes its locks (the jobs of a cluster run skip this: not the main process).
if workflow.is_main_process and (_hint := lock_hint(Path.cwd())):
    print(_hint, file=sys.stderr)


onstart:
    note_signals()


onerror:
    if _hint := stop_hint():
        print(_hint, file=sys.stderr)
