"""What the benchmark scripts share: paths, the bundled model list, and publishing results
(benchmarks/results/<key>.json and the <key> section of BENCHMARKS.md)."""

from __future__ import annotations

import datetime
import hashlib
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
RESULTS = REPO / "benchmarks" / "results"
DATA = MODELS / "data"
REAL_CACHE = Path.home() / ".cache" / "q4c" / "real"  # models/real/fetch.py's cache (sha256-pinned there)
STAMP_HASH_CHARS = 12
_STAMP = re.compile(r"<!-- stamp (\{.*?\}) -->")


def git_commit() -> str:
    """The checked-out commit (12 hex digits), '+' and the number of tracked files under q4c/ and passes/ with
    uncommitted edits when there are some (the checkout is shared: others edit it during a run),
    or 'unknown' outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "q4c", "passes"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}+{len(dirty)} edited" if dirty else head


#: the commit when this process started measuring (a long run may end at a later one)
START_COMMIT = git_commit()


#: trained models: (evaluation module in models/, its headline metric)
TASKS = {"bilstm_am": ("eval_asr", "wer"), "lstm_lm": ("eval_lm", "perplexity")}


def task_eval(name: str, model_path: Path) -> dict | None:
    """The model's task evaluation (models/eval_asr.py: WER/CER; models/eval_lm.py: perplexity)
    on its test set, or None for models without a task or a built test set."""
    if name not in TASKS:
        return None
    module_name = TASKS[name][0]
    spec = importlib.util.spec_from_file_location(module_name, MODELS / f"{module_name}.py")
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return module.evaluate(str(model_path))
    except FileNotFoundError:  # the model's test set is not built (yet)
        return None


def variants(feeds: dict[str, np.ndarray], seeds: range) -> list[dict[str, np.ndarray]]:
    """Input variants of one sample: float inputs rolled in time and jittered, integer inputs
    (token ids) redrawn within their observed range."""
    out = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        sample = {}
        for name, x in feeds.items():
            if np.issubdtype(x.dtype, np.floating):
                y = np.roll(x, int(rng.integers(0, x.shape[1])), axis=1) if x.ndim >= 3 else x
                sample[name] = (y + 0.1 * np.std(x) * rng.standard_normal(x.shape)).astype(x.dtype)
            else:
                sample[name] = rng.integers(x.min(), x.max() + 1, size=x.shape).astype(x.dtype)
        out.append(sample)
    return out


def _test_samples(name: str, count: int) -> list[dict[str, np.ndarray]] | None:
    """The first `count` samples of a trained model's test set (what its task metric scores)."""
    if name == "bilstm_am" and (DATA / "bilstm_am_test.npz").exists():
        with np.load(DATA / "bilstm_am_test.npz") as z:
            return [{"features": z[k].astype(np.float32)[None]} for k in sorted(z.files)[:count]]
    if name == "lstm_lm" and (DATA / "lstm_lm_test.npz").exists():
        with np.load(DATA / "lstm_lm_test.npz") as z:
            stream = z["tokens"].astype(np.int64)
        seq, batch = 64, 4
        return [{"tokens": stream[i * seq * batch : (i + 1) * seq * batch].reshape(batch, seq)} for i in range(count)]
    return None


def bench_data(name: str, tmp: Path, calib: int = 16, held_out: int = 16) -> tuple[Path, list[dict[str, np.ndarray]], str]:
    """(calibration directory, held-out feed dicts, a phrase saying where both came from).

    A trained model calibrates on its committed calibration set (models/data/<name>_calib:
    training text or dev utterances) and is measured on its test set; every other model on
    `calib` variants of its sample input (seeds 0..) and `held_out` other variants (seeds 100..).
    Sixteen held-out inputs, not four: with four, run-to-run noise decided some comparisons."""
    directory = tmp / f"{name}_calib"
    directory.mkdir()
    committed, test = DATA / f"{name}_calib", _test_samples(name, held_out)
    with np.load(MODELS / f"{name}.npz") as npz:
        sample = {k: npz[k] for k in npz.files}
    if committed.is_dir() and test is not None:
        files = sorted(committed.glob("*.npz"))[:calib]
        for i, path in enumerate(files):  # in the model's input dtypes (ORT's calibrator does not cast)
            with np.load(path) as z:
                np.savez(directory / f"{i:03d}.npz", **{k: z[k].astype(sample[k].dtype) for k in z.files})
        return directory, test, f"{len(files)} calibration samples from models/data/{name}_calib, {len(test)} test samples"
    for i, feeds in enumerate(variants(sample, range(calib))):
        np.savez(directory / f"{i:03d}.npz", **feeds)
    return directory, variants(sample, range(100, 100 + held_out)), f"{calib} calibration and {held_out} held-out variants"


def bundled_models() -> list[str]:
    return sorted(p.stem for p in MODELS.glob("*.onnx") if not p.name.endswith(".q4.onnx"))


def write_section(path: Path, section: str, key: str) -> None:
    """Replace the text between `<!-- key:begin -->` and `<!-- key:end -->` (or append it)."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nEvery figure here is produced by a committed script; rerun it to check.\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def merged(key: str, rows: list[dict], names: list[str]) -> list[dict]:
    """`rows` plus the saved rows of every model not rerun now (`--merge`), by model name."""
    saved = RESULTS / f"{key}.json"
    if not saved.exists():
        return rows
    # rows saved before stamps existed: their model's hash at measurement time is unknown
    kept = [{"model_sha256": None, **r} for r in json.loads(saved.read_text()) if r["model"] not in names]
    return sorted(kept + rows, key=lambda r: r["model"])  # stable: each model's rows keep their order


def sha256_prefix(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:STAMP_HASH_CHARS]


def model_file(name: str) -> Path | None:
    """The ONNX file a row's `model` name refers to: models/<name>.onnx, else the real-model cache."""
    for path in (MODELS / f"{name}.onnx", REAL_CACHE / f"{name}.onnx"):
        if path.exists():
            return path
    return None


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return "~/" + str(path.resolve().relative_to(Path.home())) if path.is_relative_to(Path.home()) else str(path)


def stamp(key: str, rows: list[dict], command: str | None = None) -> tuple[str, dict]:
    """The line a published section carries: the command, the date, the sha256 prefix of every
    model whose rows it shows (rows kept by `--merge` from an earlier run keep their own stamp
    fields, so a merged section names each model's hash and date as measured)."""
    today = datetime.date.today().isoformat()
    command = command or "python " + " ".join(shlex.quote(a) for a in [_display(Path(sys.argv[0])), *sys.argv[1:]])
    models: dict[str, str] = {}
    unknown: list[str] = []
    dates: set[str] = {today}
    for row in rows:
        name = row.get("model")
        if name is None:
            continue
        if row.get("model_sha256"):
            models.setdefault(row.get("model_file", name), row["model_sha256"])
            dates.add(row.get("date", today))
        elif name not in unknown:
            unknown.append(name)
    end = git_commit()
    measured_at = sorted({row["commit"] for row in rows if row.get("model_sha256") and row.get("commit")})
    if measured_at in ([], [START_COMMIT]):  # measured by this process: where it started (and ended)
        commit = START_COMMIT if end == START_COMMIT else f"{START_COMMIT}..{end}"
    else:  # rows measured by earlier runs (a re-render, a merge) name their own commits
        commit = ", ".join(measured_at)
    doc = {"key": key, "command": command, "date": today, "measured": sorted(dates), "models": models,
           "unstamped": unknown, "commit": commit}
    shown = ", ".join(f"`{path}` {digest}" for path, digest in models.items()) or "none recorded"
    missing = f"; rows without a recorded model hash (measured earlier): {', '.join(unknown)}" if unknown else ""
    line = (f"_Stamp: `{command}`, written {today} at commit {commit} (rows measured {', '.join(sorted(dates))}); "
            "sha256 prefixes "
            f"of the models used: {shown}{missing}._\n<!-- stamp {json.dumps(doc, sort_keys=True)} -->")
    return line, doc


def stamped_rows(rows: list[dict]) -> list[dict]:
    """Rows with the stamp fields of their model file (path, sha256 prefix, date) and the commit
    this process started at added."""
    today, cache = datetime.date.today().isoformat(), {}
    out = []
    for row in rows:
        name = row.get("model")
        if name is not None and "model_sha256" not in row:
            if name not in cache:
                path = model_file(name)
                cache[name] = None if path is None else (_display(path), sha256_prefix(path))
            if cache[name] is not None:
                row = {**row, "model_file": cache[name][0], "model_sha256": cache[name][1], "date": today,
                       "commit": START_COMMIT}
        out.append(row)
    return out


def with_stamp(section: str, line: str) -> str:
    """`section` with `line` after its heading (the first `## ` line), replacing an older stamp."""
    lines = [x for x in section.split("\n") if not x.startswith("_Stamp: ") and not _STAMP.fullmatch(x.strip())]
    at = next((i + 1 for i, x in enumerate(lines) if x.startswith("## ")), 1)
    return "\n".join([*lines[:at], "", line, *lines[at:]]).replace("\n\n\n", "\n\n")


def stale_stamps(text: str, root: Path = REPO) -> list[str]:
    """Every stamped model (a file inside the repository) whose sha256 prefix no longer matches
    the file: 'key: path stamped abc, file is def (or missing)'. Cached models (outside the
    repository, pinned by models/real/fetch.py) are not checked here."""
    problems = []
    for match in _STAMP.finditer(text):
        doc = json.loads(match.group(1))
        for path, digest in doc["models"].items():
            if path.startswith(("~", "/")):
                continue
            file = root / path
            actual = sha256_prefix(file) if file.exists() else "missing"
            if actual != digest:
                problems.append(f"{doc['key']}: {path} stamped {digest}, file is {actual}")
    return problems


def stamped_sections(text: str) -> list[str]:
    return [json.loads(m.group(1))["key"] for m in _STAMP.finditer(text)]


def publish(key: str, rows: list[dict], section: str, command: str | None = None) -> None:
    """Write the rows (benchmarks/results/<key>.json) and the section of BENCHMARKS.md, stamped."""
    rows = stamped_rows(rows)
    line, _ = stamp(key, rows, command)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{key}.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    write_section(REPO / "BENCHMARKS.md", with_stamp(section, line), key)


def run(key: str, names: list[str], measure: Callable[[str, Path], list[dict]], render: Callable[[list[dict]], str],
        *, merge: bool, write: bool) -> None:
    """Measure each model (in a scratch directory), optionally keep the other models' saved
    rows, print the BENCHMARKS.md section and, with `write`, publish it."""
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            print(f"bench: {name}", file=sys.stderr)
            rows.extend(measure(name, Path(tmp)))
    rows = stamped_rows(rows)
    if merge:
        rows = merged(key, rows, names)
    section = render(rows)
    print(with_stamp(section, stamp(key, rows)[0]))
    if write:
        publish(key, rows, section)
