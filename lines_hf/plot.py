"""The model card's plot of task-vector scale against block depth.

``draw_scales`` draws it in this process. ``ScalePlot`` draws it in a child
Python process, started before a streaming edit's pass over the weights and
collected at the end. Importing matplotlib and drawing take about 1 s, which
then runs on another core instead of adding to the wall time. This module
imports nothing heavy at the top, because the child imports it.

Run as a program: ``python -m lines_hf.plot OUTPUT.png RECORD_JSON``, where
the JSON has the record's ``stacks``, ``alpha``, ``beta`` and
``non_block_scale``. ``ScalePlot`` starts its child with ``python -I -c``
instead, for the reason given there.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

LOG = logging.getLogger(__name__)

PLOT_NAME = "lines_scales.png"

# The record fields that the plot reads. The child gets only these.
PLOT_FIELDS = ("stacks", "alpha", "beta", "non_block_scale")

# The interpreter that runs the plot process.
CHILD_PYTHON = sys.executable

# How long ``ScalePlot.result`` waits for the child before giving up on the plot
# (matplotlib builds its font cache on first use, which can take a while).
# NOTE: 120 s is an estimate, not measured against a cold font cache on a slow disk.
CHILD_TIMEOUT_S = 120.0

_PACKAGE_PARENT = Path(__file__).resolve().parent.parent

# The child's program: argv is [search path as JSON, output path, record as JSON].
_CHILD_CODE = (
    "import json, sys; sys.path[:0] = json.loads(sys.argv.pop(1)); "
    "from lines_hf.plot import main; sys.exit(main())"
)

_MISSING_MATPLOTLIB = (
    "matplotlib is not installed, so the model card has no scale plot. "
    "Install it with `pip install matplotlib` (or `lines_hf[eval]`)."
)


def has_blocks(record: Mapping[str, Any]) -> bool:
    """Return true if ``record`` lists at least one block scale to plot."""
    stacks = record.get("stacks") or {}
    return any(info.get("scales") for info in stacks.values())


def draw_scales(record: Mapping[str, Any], path: str | os.PathLike) -> Path | None:
    """Draw the scale of every block against its depth and save it as a PNG at ``path``.

    One line per stack (x: block index, y: scale), and a dashed line for the
    scale of tensors outside every block. Uses matplotlib's Agg canvas directly,
    so the caller's pyplot backend is left alone. Returns ``None`` (and logs a
    warning) when matplotlib is not installed or the record lists no blocks.
    """
    if not has_blocks(record):
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        LOG.warning(_MISSING_MATPLOTLIB)
        return None

    figure = Figure(figsize=(6.0, 3.6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, info in record["stacks"].items():
        scales = info.get("scales") or []
        axes.plot(range(len(scales)), scales, marker="o", label=name)
    if record.get("non_block_scale") is not None:
        axes.axhline(float(record["non_block_scale"]), linestyle="--", color="grey", label="outside blocks")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("block (0 = closest to the input)")
    axes.set_ylabel("scale of the task vector")
    axes.set_title(f"LiNeS: alpha = {_number(record.get('alpha'))}, beta = {_number(record.get('beta'))}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()

    path = Path(path)
    figure.savefig(path, format="png")
    return path


class ScalePlot:
    """The scale plot of ``record``, drawn into ``path`` by a child process.

    Start it with ``with ScalePlot(record, path) as plot:`` and call
    ``plot.result()`` when the file is needed. Leaving the block with an
    exception stops the child, so an aborted edit leaves no process behind
    that still writes into its output folder. The child has a session of its
    own, so Ctrl-C in a terminal reaches only this process, which then stops
    the child itself.

    Any failure of the child (matplotlib missing, a crash, a timeout) costs only
    the plot: ``result()`` logs a warning and returns ``None``, as
    ``draw_scales`` does.
    """

    def __init__(self, record: Mapping[str, Any], path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._process: subprocess.Popen | None = None
        self._stderr = None
        self._outcome: Path | None = None

        if not has_blocks(record):
            return
        if importlib.util.find_spec("matplotlib") is None:
            LOG.warning(_MISSING_MATPLOTLIB)
            return

        payload = json.dumps({key: record.get(key) for key in PLOT_FIELDS})
        # Isolated mode (-I) keeps the working directory and PYTHON* variables off the
        # child's import path, so a stray lines_hf/ or matplotlib.py there never runs.
        # The child gets this process's path instead, without the working-directory
        # entry '', so it imports this lines_hf and the packages this process can.
        entries = [str(_PACKAGE_PARENT), *(entry for entry in sys.path if entry)]
        search_path = json.dumps([os.path.abspath(entry) for entry in entries])
        self._stderr = tempfile.TemporaryFile()
        try:
            self._process = subprocess.Popen(
                [CHILD_PYTHON, "-I", "-c", _CHILD_CODE, search_path, os.fspath(self.path), payload],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self._stderr,
                start_new_session=True,
            )
        except OSError as error:
            LOG.warning("could not start a process to draw the scale plot (%s); drawing it here instead", error)
            self._stderr.close()
            self._stderr = None
            self._outcome = draw_scales(record, self.path)

    def result(self, timeout: float = CHILD_TIMEOUT_S) -> Path | None:
        """Wait for the child and return the plot's path, or ``None`` when there is no plot."""
        if self._process is None:
            return self._outcome
        try:
            returncode = self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.cancel()
            LOG.warning("drawing the scale plot took over %.0f s; the model card has no plot", timeout)
            return None
        except BaseException:
            # Interrupted while waiting (Ctrl-C, SIGTERM): stop the child before going on.
            self.cancel()
            raise
        self._process = None
        message = self._close_stderr()
        if returncode == 0 and self.path.is_file():
            self._outcome = self.path
            return self.path
        LOG.warning(
            "drawing the scale plot failed (exit status %s), so the model card has no plot: %s",
            returncode,
            message.strip().splitlines()[-1] if message.strip() else "no message",
        )
        self.path.unlink(missing_ok=True)
        return None

    def cancel(self) -> None:
        """Stop the child, if it still runs, and remove what it wrote."""
        if self._process is not None:
            _stop(self._process)
            self._process = None
            self.path.unlink(missing_ok=True)
        self._close_stderr()

    def _close_stderr(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        text = self._stderr.read().decode("utf-8", errors="replace")
        self._stderr.close()
        self._stderr = None
        return text

    def __enter__(self) -> ScalePlot:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            self.cancel()
        elif self._process is not None:
            # result() was never called: wait for the child anyway, so none outlives the caller.
            self.result()


def _stop(process: subprocess.Popen) -> None:
    process.kill()
    process.wait()


def _number(value: Any) -> str:
    return "unknown" if value is None else format(float(value), ".6g")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if len(argv) != 2:
        LOG.error("usage: python -m lines_hf.plot OUTPUT.png RECORD_JSON")
        return 2
    written = draw_scales(json.loads(argv[1]), argv[0])
    return 0 if written is not None else 1


if __name__ == "__main__":
    sys.exit(main())
