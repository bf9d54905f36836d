"""``edge-bms``: the command line of the edge package (argparse: no dependency beyond
the edge's own).

    edge-bms replay --input cell.csv --output est.csv [--cell NAME_OR_DIR]
                    [--initial-soc X] [--initial-soc-sigma S] [--method ekf|ukf]
    edge-bms identify ...            (edge_bms.identify)
    edge-bms run --config pack.toml  (edge_bms.service.cli: packs over MQTT, contract 5)
    edge-bms demo [--port P]         (in-process broker + pack simulator + service)

``replay`` (DESIGN.md contract 4) runs the estimator over one cell's recording, row by
row (streaming: ``-`` reads stdin / writes stdout, one output row per input row, so it
works in a pipe). Input columns (any order, others ignored): ``time_s``, ``current_a``
(+ = discharge), ``voltage_v`` (empty or ``nan``: the sample is missing, predict only),
``temperature_c``. Output: ``time_s,soc,soc_sigma,v_pred,innovation``. A bad row stops
the run with ``file:line`` and the reason; the output file is then not written.

Other modules add subcommands through ``register(subparsers)`` (see OPTIONAL_COMMANDS);
each sets ``func`` (``args -> exit status``) on its parser.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import math
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, NamedTuple

from edge_bms.cell import DEFAULT_CELL, CellModel, load_cell
from edge_bms.correction import DEFAULT_MODEL, VoltageCorrectionNet, try_load_correction
from edge_bms.errors import BmsError, InputError
from edge_bms.estimator import PackEstimator

INPUT_COLUMNS = ("time_s", "current_a", "voltage_v", "temperature_c")
OUTPUT_COLUMNS = ("time_s", "soc", "soc_sigma", "v_pred", "innovation", "correction_used")
# Modules that add subcommands when they are installed: ``register(subparsers)``.
OPTIONAL_COMMANDS = ("edge_bms.identify", "edge_bms.service.cli")


class ReplaySummary(NamedTuple):
    rows: int
    dropouts: int  # rows without a voltage (predict only)
    final_soc: float
    final_soc_sigma: float
    held: int = 0  # rows whose current or temperature was missing: the last one was held


def replay(
    source: IO[str],
    sink: IO[str],
    model: CellModel,
    *,
    name: str = "<input>",
    initial_soc: float | None = None,
    initial_soc_sigma: float | None = None,
    method: str = "ekf",
    flush: bool = False,
    correction: VoltageCorrectionNet | None = None,
    correction_fallback: str = "none",
) -> ReplaySummary:
    """Estimate SOC for each row of ``source`` (CSV) and write it to ``sink``.

    Raises InputError as ``name:line: reason`` for a malformed file.
    """
    if method not in ("ekf", "ukf"):
        raise InputError(f"method must be 'ekf' or 'ukf', got {method!r}")
    est = PackEstimator(
        model,
        1,
        method="ukf" if method == "ukf" else "ekf",
        initial_soc=initial_soc,
        initial_soc_sigma=initial_soc_sigma,
        correction=correction,
        correction_fallback=correction_fallback,
    )
    reader = csv.reader(_data_lines(source))
    header: list[str] | None = None
    cols: tuple[int, ...] = ()
    writer = csv.writer(sink, lineterminator="\n")
    rows = dropouts = held = 0
    last_it: tuple[float, float] | None = None
    soc = sigma = math.nan
    prev_t: float | None = None
    for row in reader:
        line = reader.line_num
        if not row or all(not f.strip() for f in row):
            continue
        if header is None:
            header = [h.strip() for h in row]
            missing = [c for c in INPUT_COLUMNS if c not in header]
            if missing:
                raise InputError(
                    f"{name}:{line}: missing column(s) {', '.join(missing)} "
                    f"(the header has: {', '.join(header)})"
                )
            cols = tuple(header.index(c) for c in INPUT_COLUMNS)
            writer.writerow(OUTPUT_COLUMNS)
            continue
        if len(row) < len(header):
            raise InputError(f"{name}:{line}: {len(row)} fields, the header has {len(header)}")
        t_text = row[cols[0]].strip()
        t, i, v, temp = (
            _number(name, line, c, row[k]) for c, k in zip(INPUT_COLUMNS, cols, strict=True)
        )
        # A missing current or temperature sample holds the last one (what a BMS does
        # with a dropped frame); before any valid sample there is nothing to hold.
        if math.isnan(i) or math.isnan(temp):
            if last_it is None:
                raise InputError(
                    f"{name}:{line}: current_a or temperature_c missing in the first row"
                )
            i = last_it[0] if math.isnan(i) else i
            temp = last_it[1] if math.isnan(temp) else temp
            held += 1
        last_it = (i, temp)
        if prev_t is not None and not t > prev_t:
            raise InputError(
                f"{name}:{line}: time_s {t_text} is not after the previous row's {prev_t!r}"
            )
        try:
            e = est.step(t, i, [v], temp)
        except InputError as exc:
            raise InputError(f"{name}:{line}: {exc}") from exc
        prev_t = t
        rows += 1
        dropouts += math.isnan(v)
        soc, sigma = float(e.soc[0]), float(e.soc_sigma[0])
        writer.writerow(
            (
                t_text,
                f"{soc:.6f}",
                f"{sigma:.6g}",
                f"{float(e.v_pred[0]):.6f}",
                f"{float(e.innovation[0]):.6f}",
                int(e.flags.correction_used),
            )
        )
        if flush:
            sink.flush()
    if header is None:
        raise InputError(f"{name}: empty: no header line with {', '.join(INPUT_COLUMNS)}")
    if rows == 0:
        raise InputError(f"{name}: no data rows after the header")
    return ReplaySummary(rows, dropouts, soc, sigma, held)


def _data_lines(source: IO[str]) -> Iterator[str]:
    """Lines of ``source``, comment lines (``#``) blanked so csv's line numbers stay right."""
    for text in source:
        yield "\n" if text.lstrip().startswith("#") else text


def _number(name: str, line: int, column: str, text: str) -> float:
    """A field as float; an empty or NaN field is a missing sample (NaN); anything else
    must be a finite number. A missing time is an error (the row cannot be placed)."""
    s = text.strip()
    if column != "time_s" and (not s or s.lower() == "nan"):
        return math.nan
    try:
        x = float(s)
    except ValueError:
        raise InputError(f"{name}:{line}: {column} {s!r} is not a number") from None
    if not math.isfinite(x):
        raise InputError(f"{name}:{line}: {column} {s!r} is not a finite number")
    return x


@contextmanager
def _open_output(path: str) -> Iterator[IO[str]]:
    """stdout for ``-``; else a temporary file beside ``path``, renamed over it only when
    the block succeeds (a failed replay leaves no half-written file)."""
    if path == "-":
        yield sys.stdout
        return
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            yield f
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def _open_input(path: str) -> Iterator[IO[str]]:
    if path == "-":
        yield sys.stdin
        return
    try:
        f = open(path, newline="", encoding="utf-8")  # noqa: SIM115 (closed below; errors become InputError)
    except OSError as exc:
        raise InputError(f"cannot read --input {path}: {exc.strerror}") from exc
    with f:
        yield f


def _replay(args: argparse.Namespace) -> int:
    model = load_cell(args.cell)
    net, reason, why = (None, "none", "") if args.no_correction else _correction(args, model)
    if why:
        print(f"edge-bms replay: plain filter, no correction network: {why}", file=sys.stderr)
    out_dir = Path(args.output).parent
    if args.output != "-" and not out_dir.is_dir():
        raise InputError(f"--output {args.output}: directory {out_dir} does not exist")
    name = "<stdin>" if args.input == "-" else args.input
    try:
        with _open_input(args.input) as source, _open_output(args.output) as sink:
            summary = replay(
                source,
                sink,
                model,
                name=name,
                initial_soc=args.initial_soc,
                initial_soc_sigma=args.initial_soc_sigma,
                method=args.method,
                flush=args.output == "-",
                correction=net,
                correction_fallback=reason,
            )
    except UnicodeDecodeError as exc:
        raise InputError(f"{name}: not a text (UTF-8) CSV file: {exc.reason}") from exc
    except OSError as exc:  # the output could not be created or replaced
        raise InputError(f"cannot write --output {args.output}: {exc.strerror or exc}") from exc
    with_net = f" + {net.record.name} {net.version}" if net is not None else ""
    print(
        f"edge-bms replay: {summary.rows} rows ({summary.dropouts} without voltage, "
        f"{summary.held} with current or temperature held), "
        f"cell {model.name}, {args.method}{with_net}; final SOC {summary.final_soc:.4f} "
        f"+- {summary.final_soc_sigma:.4f} -> {args.output}",
        file=sys.stderr,
    )
    return 0


def _correction(
    args: argparse.Namespace, model: CellModel
) -> tuple[VoltageCorrectionNet | None, str, str]:
    """The network and "" , or None with the fallback reason and a message for the user."""
    net, reason, why = try_load_correction(args.correction)
    if net is None:
        if args.correction is not None:  # asked for by name: failing to load is an error
            raise InputError(f"--correction {args.correction}: {why}")
        return None, reason, why
    trained_for = str(net.record.extra.get("cell", ""))
    if trained_for and trained_for != model.name:
        if args.correction is not None:
            raise InputError(
                f"--correction {args.correction}: trained for cell {trained_for!r}, "
                f"not {model.name!r}"
            )
        return None, "metadata", ""  # the default network belongs to the default cell
    return net, "", ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-bms", description="Battery state estimation on the edge (numpy + onnxruntime)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "replay",
        help="estimate SOC of one cell from a CSV recording",
        description=(
            "Run the SOC filter over a CSV with columns "
            + ",".join(INPUT_COLUMNS)
            + " (positive current = discharge); write "
            + ",".join(OUTPUT_COLUMNS)
            + ". An empty voltage marks a missing sample."
        ),
    )
    p.add_argument("--input", required=True, help="input CSV ('-': stdin)")
    p.add_argument("--output", required=True, help="output CSV ('-': stdout)")
    p.add_argument(
        "--cell",
        default=None,
        help=f"a shipped cell model name or a cell.json file / directory (default: {DEFAULT_CELL})",
    )
    p.add_argument(
        "--initial-soc",
        type=_fraction,
        default=None,
        help="SOC at the first row, 0..1 (default: from the first row's voltage, as OCV)",
    )
    p.add_argument(
        "--initial-soc-sigma",
        type=_positive,
        default=None,
        help="its standard deviation (default 0.3 with --initial-soc; from OCV: from the OCV "
        "slope, 1-10 %%)",
    )
    p.add_argument("--method", choices=("ekf", "ukf"), default="ekf", help="filter (default ekf)")
    p.add_argument(
        "--correction",
        default=None,
        help="voltage-correction network: a shipped name or an .onnx path with its .json record "
        f"(default: {DEFAULT_MODEL} when it was trained for the cell)",
    )
    p.add_argument(
        "--no-correction", action="store_true", help="the plain filter, without the network"
    )
    p.set_defaults(func=_replay)
    _register_optional(sub)
    return parser


def _fraction(text: str) -> float:
    x = float(text)
    if not 0.0 <= x <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within 0..1, got {text}")
    return x


def _positive(text: str) -> float:
    x = float(text)
    if not (math.isfinite(x) and x > 0):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return x


def _register_optional(sub: Any) -> None:
    """Subcommands of modules that may not exist yet; a missing module is skipped, an
    error inside an existing one is not hidden."""
    for module_name in OPTIONAL_COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        module.register(sub)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``edge-bms``; returns the exit status (2: bad input or model)."""
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except BmsError as exc:
        print(f"edge-bms: error: {exc}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
