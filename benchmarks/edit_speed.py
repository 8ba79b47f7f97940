"""Time ``lines-hf edit`` against mergekit's ``task_arithmetic`` on the same Llama-shaped bf16 checkpoint.

Steps, in one run:

1. Write the base and one fine-tune of a ~1e9-parameter Llama-shaped bf16
   model in 2 shards with ``make_llama_checkpoint.py`` (kept between runs).
2. Run each tool as its own process, ``--repeats`` times, alternating which
   goes first. Before every run the output folder is deleted, every input
   file is read once (so both tools start from a warm page cache) and
   ``sync`` flushes dirty pages left by the previous run. Neither tool
   calls fsync itself, so its output may still be in the page cache when
   the clock stops. Wall time runs from process start to exit and includes
   imports. Peak RSS is ``ru_maxrss`` from ``wait4`` for that process.
3. Compare the outputs tensor by tensor. mergekit computes in bf16 and rounds
   the task vector, its scaled value and the sum, while lines_hf computes in
   float32 and rounds once. Where base + s * delta nearly cancels, mergekit's
   intermediate roundings are large next to the result. The difference is
   therefore reported in bf16 ulps at three magnitudes: the output's, the
   largest input or output, and the largest operand including mergekit's
   intermediates (pass: at most 2.5, the bound its roundings allow). mergekit's
   output is checked against a bf16 emulation of its arithmetic, and lines_hf's
   against the float32 formula
   ``base + s * (finetuned - base)`` rounded once to bf16, which must match
   bit for bit. ``s`` comes from this script's own schedule: block ``l`` of
   ``L`` gets ``alpha + beta * l / (L - 1)`` and every other tensor ``alpha``.
4. With ``--double``, repeat the timing on a ~2e9-parameter model (43 layers)
   to show how peak RSS changes with model size.

mergekit runs from its own virtual environment (``--mergekit-venv``) with
``weight: [alpha, alpha + beta]`` and ``normalize: false``. Its per-layer list
is interpolated over the layers with ``t = l / (L - 1)`` and tensors outside
the layers take the first value, which equals lines_hf's default scale
``alpha`` for them, so both tools compute the same edit.

Example (from the repository root; ~2 GB per model folder in benchmarks/_work)::

    flock /tmp/lines_hf_heavy.lock .venv/bin/python benchmarks/edit_speed.py --repeats 3 --double
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
READ_BLOCK = 16 * 1024 * 1024
COMPARE_CHUNK = 1024 * 1024
LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.")
OMP_THREADS: int | None = None  # set from --omp-threads; None leaves each tool's default


@dataclass
class RunResult:
    """One timed run of one tool."""

    tool: str
    model: str
    wall_s: float
    peak_rss_mb: float
    returncode: int
    load_before: float  # 1-minute load average when the run started


# --------------------------------------------------------------------------- running


def warm_and_flush(folders: list[Path]) -> None:
    """Read every file of ``folders`` into the page cache, then flush dirty pages with ``sync``."""
    for folder in folders:
        for path in sorted(folder.iterdir()):
            if path.is_file():
                with open(path, "rb", buffering=0) as handle:
                    while handle.read(READ_BLOCK):
                        pass
    os.sync()


def timed_run(tool: str, model: str, command: list[str], log_path: Path) -> RunResult:
    """Run ``command`` as a child process; return its wall time and peak RSS (``ru_maxrss``, KiB on Linux)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    if OMP_THREADS is not None:
        env["OMP_NUM_THREADS"] = str(OMP_THREADS)
    load = os.getloadavg()[0]
    with open(log_path, "w", encoding="utf-8") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
        raise RuntimeError(f"{tool} failed with exit status {process.returncode}; end of {log_path}:\n{tail}")
    return RunResult(tool, model, round(wall, 2), round(usage.ru_maxrss / 1024, 1), process.returncode, load)


def lines_hf_command(args: argparse.Namespace, base: Path, finetuned: Path, output: Path) -> list[str]:
    return [
        str(args.lines_hf), "edit", "--base", str(base), "--finetuned", str(finetuned),
        "--alpha", repr(args.alpha), "--beta", repr(args.beta), "--output", str(output), "--no-progress", "--quiet",
    ]


def mergekit_command(args: argparse.Namespace, config_path: Path, output: Path) -> list[str]:
    return [str(args.mergekit_venv / "bin" / "mergekit-yaml"), str(config_path), str(output), "--quiet", "--no-copy-tokenizer"]


def write_mergekit_config(path: Path, base: Path, finetuned: Path, alpha: float, beta: float) -> None:
    """Write mergekit's YAML config of the same edit (absolute paths, so mergekit never queries the Hub)."""
    path.write_text(
        "merge_method: task_arithmetic\n"
        f"base_model: {base.resolve()}\n"
        "models:\n"
        f"  - model: {finetuned.resolve()}\n"
        "    parameters:\n"
        f"      weight: [{alpha!r}, {alpha + beta!r}]\n"
        "parameters:\n"
        "  normalize: false\n"
        "dtype: bfloat16\n",
        encoding="utf-8",
    )


def ensure_checkpoint(work: Path, params: float, scale: float, seed: int) -> Path:
    """Write (or keep) the base and one fine-tune of a model of ``params * scale`` parameters; return its folder."""
    folder = work / f"llama{params * scale / 1e9:g}b"
    command = [
        sys.executable, str(HERE / "make_llama_checkpoint.py"), "--out", str(folder), "--finetunes", "1",
        "--params", repr(params), "--scale", repr(scale), "--seed", str(seed), "--skip-existing",
    ]
    subprocess.run(command, check=True)
    return folder


def time_tools(args: argparse.Namespace, model_dir: Path, tools: list[str], repeats: int) -> list[RunResult]:
    """Run each of ``tools`` ``repeats`` times on ``model_dir``, alternating the order; keep the last outputs."""
    base, finetuned = model_dir / "base", model_dir / "ft0"
    config_path = model_dir / "mergekit_task_arithmetic.yml"
    write_mergekit_config(config_path, base, finetuned, args.alpha, args.beta)
    outputs = {tool: model_dir / f"out_{tool}" for tool in tools}
    results = []
    for repeat in range(repeats):
        order = tools if repeat % 2 == 0 else tools[::-1]
        for tool in order:
            output = outputs[tool]
            shutil.rmtree(output, ignore_errors=True)
            warm_and_flush([base, finetuned])
            if tool == "lines_hf":
                command = lines_hf_command(args, base, finetuned, output)
            else:
                command = mergekit_command(args, config_path, output)
            result = timed_run(tool, model_dir.name, command, model_dir / f"{tool}.log")
            print(f"{model_dir.name} {tool} run {repeat + 1}: {result.wall_s:.1f} s, {result.peak_rss_mb:.0f} MB", flush=True)
            results.append(result)
    return results


# --------------------------------------------------------------------------- comparing


def expected_scale(name: str, depth: int, alpha: float, beta: float) -> float:
    """Return the LiNeS scale of tensor ``name`` in a Llama model with ``depth`` layers."""
    match = LAYER_NAME.match(name)
    if match is None:
        return alpha
    # Dividing first, as lines_hf does, makes the last layer exactly alpha + beta;
    # the other order can differ in the last bit of the float64 scale.
    return alpha + beta * (int(match.group(1)) / (depth - 1))


def mergekit_weight(name: str, depth: int, alpha: float, beta: float) -> float:
    """Return mergekit 0.1.5's weight for ``name`` from the list ``[alpha, alpha + beta]``.

    mergekit interpolates a 2-value list at ``t = l / (L - 1)`` in Python
    floats (``(1 - t) * v0 + t * v1``, and exactly ``v1`` at ``t = 1``), and
    uses ``t = 0`` outside the layers.
    """
    match = LAYER_NAME.match(name)
    t = 0.0 if match is None else int(match.group(1)) / (depth - 1)
    if t >= 1.0:
        return alpha + beta
    return (1 - t) * alpha + t * (alpha + beta)


def emulate_mergekit(base, finetuned, weight: float):
    """Return mergekit 0.1.5's ``task_arithmetic`` result for one fine-tune and its two intermediates, in bf16.

    Its ``merge_group`` rounds ``finetuned - base``, the weight (a bf16
    tensor), the weighted delta and the final sum to bf16. Returns
    ``(result, delta, weighted_delta)``.
    """
    import torch

    delta = finetuned - base
    scaled = delta * torch.tensor([weight], dtype=torch.bfloat16)
    return base + scaled, delta, scaled


def bf16_ulp(values):
    """Return the spacing of bf16 numbers at the magnitude of each element of ``values`` (float32)."""
    import torch

    # |v| = m * 2**e with m in [0.5, 1), and bf16 keeps 8 significant bits, so
    # the spacing is 2**(e - 8); subnormals share the spacing of the smallest normal.
    _, exponent = torch.frexp(values.abs())
    return torch.ldexp(torch.ones_like(values), (exponent.clamp(min=-125) - 8))


def compare_outputs(model_dir: Path, alpha: float, beta: float) -> dict:
    """Compare lines_hf's output with mergekit's and with the float32 formula, chunk by chunk."""
    import torch

    from lines_hf.checkpoint import FolderSource

    # Small chunks with one thread ran several times faster on the busy 2-core machine.
    torch.set_num_threads(1)
    base = FolderSource(model_dir / "base")
    tuned = FolderSource(model_dir / "ft0")
    ours = FolderSource(model_dir / "out_lines_hf")
    theirs = FolderSource(model_dir / "out_mergekit")
    depth = int(base.config["num_hidden_layers"])
    if depth < 2:
        raise RuntimeError(f"the model in {model_dir} has {depth} layer(s); use --params 2e8 or more for 2 layers")

    names = [spec.name for spec in ours.specs()]
    their_names = {spec.name for spec in theirs.specs()}
    if set(names) != their_names:
        raise RuntimeError(f"the outputs hold different tensors: {sorted(set(names) ^ their_names)[:10]}")

    report = {
        "tensors": len(names),
        "elements": 0,
        "max_abs_diff_vs_mergekit": 0.0,
        "max_ulp_diff_vs_mergekit_at_output": 0.0,
        "max_ulp_diff_vs_mergekit_at_inputs": 0.0,
        "max_ulp_diff_vs_mergekit_at_operands": 0.0,
        "elements_differing_from_mergekit": 0,
        "elements_over_1_ulp_at_output": 0,
        "elements_differing_from_float32_formula": 0,
        "elements_differing_from_mergekit_emulation": 0,
    }
    for spec in ours.specs():
        scale = expected_scale(spec.name, depth, alpha, beta)
        for start in range(0, spec.numel, COMPARE_CHUNK):
            count = min(COMPARE_CHUNK, spec.numel - start)
            b16 = base.read_flat(spec.name, start, count)
            f16 = tuned.read_flat(spec.name, start, count)
            b, f = b16.float(), f16.float()
            mine = ours.read_flat(spec.name, start, count)
            other = theirs.read_flat(spec.name, start, count)
            formula = ((f - b) * scale + b).to(torch.bfloat16)
            emulated, delta16, scaled16 = emulate_mergekit(b16, f16, mergekit_weight(spec.name, depth, alpha, beta))
            report["elements_differing_from_mergekit_emulation"] += int(
                (emulated.view(torch.int16) != other.view(torch.int16)).sum()
            )
            report["elements_differing_from_float32_formula"] += int((formula.view(torch.int16) != mine.view(torch.int16)).sum())

            mine32, other32 = mine.float(), other.float()
            diff = (mine32 - other32).abs()
            output_size = torch.maximum(mine32.abs(), other32.abs())
            input_size = torch.maximum(torch.maximum(b.abs(), f.abs()), output_size)
            operand_size = torch.maximum(torch.maximum(delta16.float().abs(), scaled16.float().abs()), input_size)
            ulps_at_output = diff / bf16_ulp(output_size)
            ulps_at_inputs = diff / bf16_ulp(input_size)
            ulps_at_operands = diff / bf16_ulp(operand_size)
            report["elements"] += count
            report["elements_differing_from_mergekit"] += int((diff > 0).sum())
            report["elements_over_1_ulp_at_output"] += int((ulps_at_output > 1).sum())
            report["max_abs_diff_vs_mergekit"] = max(report["max_abs_diff_vs_mergekit"], float(diff.max()))
            report["max_ulp_diff_vs_mergekit_at_output"] = max(
                report["max_ulp_diff_vs_mergekit_at_output"], float(ulps_at_output.max())
            )
            report["max_ulp_diff_vs_mergekit_at_inputs"] = max(
                report["max_ulp_diff_vs_mergekit_at_inputs"], float(ulps_at_inputs.max())
            )
            report["max_ulp_diff_vs_mergekit_at_operands"] = max(
                report["max_ulp_diff_vs_mergekit_at_operands"], float(ulps_at_operands.max())
            )
    for source in (base, tuned, ours, theirs):
        source.close()
    # With U the bf16 ulp at the largest operand (inputs, mergekit's bf16 delta
    # and weighted delta, outputs), mergekit's three roundings and its bf16
    # weight (relative error <= 2**-9) stay within 2U of the exact value for
    # weights <= 1, and lines_hf's single rounding within U/2.
    report["within_rounding_bound"] = report["max_ulp_diff_vs_mergekit_at_operands"] <= 2.5
    return report


# --------------------------------------------------------------------------- reporting


def best(results: list[RunResult], tool: str, model: str) -> RunResult:
    """Return the fastest run of ``tool`` on ``model``."""
    return min((r for r in results if r.tool == tool and r.model == model), key=lambda r: r.wall_s)


def summary_table(results: list[RunResult]) -> str:
    """Return a Markdown table of every run, then the best run of each tool per model."""
    lines = ["| model | tool | run | wall (s) | peak RSS (MB) | load avg before |", "|---|---|---|---|---|---|"]
    counters: dict[tuple[str, str], int] = {}
    for r in results:
        counters[(r.model, r.tool)] = counters.get((r.model, r.tool), 0) + 1
        lines.append(f"| {r.model} | {r.tool} | {counters[(r.model, r.tool)]} | {r.wall_s:.1f} | {r.peak_rss_mb:.0f} | {r.load_before:.1f} |")
    return "\n".join(lines)


def machine_info(args: argparse.Namespace) -> dict:
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mergekit_version = subprocess.run(
        [str(args.mergekit_venv / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mergekit": mergekit_version or "not installed",
        "torch_threads": torch.get_num_threads(),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Time lines-hf edit against mergekit task_arithmetic.")
    parser.add_argument("--work", type=Path, default=HERE / "_work", help="scratch folder for checkpoints and outputs")
    parser.add_argument("--alpha", type=float, default=0.2, help="LiNeS alpha (default 0.2)")
    parser.add_argument("--beta", type=float, default=0.8, help="LiNeS beta (default 0.8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per tool and model (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated checkpoints (default 0)")
    parser.add_argument("--params", type=float, default=1e9, help="parameters of the smaller model (default 1e9)")
    parser.add_argument("--double", action="store_true", help="also time both tools on a ~2e9-parameter model")
    parser.add_argument("--skip-mergekit", action="store_true", help="time lines_hf only and skip the comparison")
    parser.add_argument(
        "--lines-hf", type=Path, default=Path(sys.executable).parent / "lines-hf", help="the lines-hf console script"
    )
    parser.add_argument(
        "--mergekit-venv", type=Path, default=HERE / "_work" / "mergekit-venv", help="virtual environment with mergekit"
    )
    parser.add_argument(
        "--omp-threads", type=int, help="set OMP_NUM_THREADS for both tools (default: leave their defaults)"
    )
    parser.add_argument("--keep-outputs", action="store_true", help="keep the edited model folders afterwards")
    return parser


def main(argv: list[str] | None = None) -> int:
    global OMP_THREADS
    args = build_parser().parse_args(argv)
    OMP_THREADS = args.omp_threads
    args.work.mkdir(parents=True, exist_ok=True)
    tools = ["lines_hf"]
    if not args.skip_mergekit:
        tools.append("mergekit")
    info = machine_info(args)
    print(json.dumps(info), flush=True)

    scales = [1.0, 2.0] if args.double else [1.0]
    results: list[RunResult] = []
    comparisons = {}
    names = []
    for scale in scales:
        model_dir = ensure_checkpoint(args.work, args.params, scale, args.seed)
        name = model_dir.name
        names.append(name)
        results += time_tools(args, model_dir, tools, args.repeats)
        # One comparison is enough: the larger model only shows how time and RSS scale.
        if not args.skip_mergekit and scale == 1.0:
            comparisons[name] = compare_outputs(model_dir, args.alpha, args.beta)
            print(name, json.dumps(comparisons[name]), flush=True)
        if not args.keep_outputs:
            for tool in tools:
                shutil.rmtree(model_dir / f"out_{tool}", ignore_errors=True)

    record = {
        "machine": info,
        "omp_threads": args.omp_threads,
        "alpha": args.alpha,
        "beta": args.beta,
        "runs": [asdict(r) for r in results],
        "comparisons": comparisons,
    }
    print()
    print(summary_table(results))
    print()
    for name in names:
        for tool in [t for t in tools if t != "mergekit"]:
            ours = best(results, tool, name)
            line = f"{name}: {tool} best {ours.wall_s:.1f} s, {ours.peak_rss_mb:.0f} MB"
            if not args.skip_mergekit:
                theirs = best(results, "mergekit", name)
                line += (
                    f"; mergekit best {theirs.wall_s:.1f} s, {theirs.peak_rss_mb:.0f} MB; time ratio "
                    f"{ours.wall_s / theirs.wall_s:.2f}, RSS ratio {ours.peak_rss_mb / theirs.peak_rss_mb:.2f}"
                )
                record.setdefault("ratios", {}).setdefault(name, {})[tool] = {
                    "wall": round(ours.wall_s / theirs.wall_s, 3),
                    "rss": round(ours.peak_rss_mb / theirs.peak_rss_mb, 3),
                }
            print(line)
    out_path = args.work / "edit_speed.json"
    out_path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
