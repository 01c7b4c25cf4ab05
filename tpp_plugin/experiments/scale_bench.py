r"""Cost as the work grows (``python -m tpp_plugin bench --scale``): torchvision ResNets at
224 px on synthetic inputs, every case in a fresh subprocess so that its peak resident memory
(``VmHWM``) is its own.

Cases, per model (``resnet18``; ``resnet50`` with ``--models resnet18 resnet50``):

* ``ltb`` / ``rate`` / ``tpp``: SpikingJelly 2.x's ``LocalThresholdBalancingRecipe``,
  ``RateCodingRecipe('99.9%')`` and the plugin's ``TPPCalibrationRecipe(T)`` converting the
  ANN with a loader of ``n`` images (``--images``, default 128 512 1024) in batches of
  ``--batch-size``;
* ``snn``: one batch through the ANN, through the converted SNN in multi-step mode
  (``T`` steps) and in count mode;
* ``finetune``: one epoch of fine-tuning the calibration (``tpp_plugin.calibration.finetune``
  from the loader) against one epoch of training the ANN (SGD, cross-entropy on random labels)
  on the same loader (``--finetune-images``).

The ANN has random weights and batch-norm statistics from one pass over a batch (no download);
the images are generated on demand from their index (a lazy data set: nothing holds them all).
Times are wall clock of the measured call only; memory is the subprocess's peak RSS, with its
RSS before the call (model built, libraries loaded) beside it.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time

import torch

import tpp_plugin

from ..calibration import calibrate_for_T
from ..calibration.finetune import finetune
from ..cli import nonnegative_int, positive_int

__all__ = ["SyntheticImages", "make_ann", "run_case", "run_all", "format_table", "main"]

#: where ``--write-docs`` puts the table (between these markers of docs/performance.md)
DOC_BEGIN = "<!-- scale-bench:begin -->"
DOC_END = "<!-- scale-bench:end -->"


class SyntheticImages(torch.utils.data.Dataset):
    """``n`` images ``[3, size, size]`` (standard normal) and labels, each generated from its
    index when asked for: the data set holds nothing."""

    def __init__(self, n: int, size: int = 224, classes: int = 1000, seed: int = 0):
        self.n, self.size, self.classes, self.seed = n, size, classes, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        x = torch.randn(3, self.size, self.size, generator=gen)
        return x, int(torch.randint(self.classes, (), generator=gen))


def make_ann(name: str, size: int = 224, seed: int = 0) -> torch.nn.Module:
    """torchvision's ``name`` with random weights and batch-norm statistics from one pass over
    a batch of 32 synthetic images, in eval mode."""
    import torchvision

    torch.manual_seed(seed)
    ann = getattr(torchvision.models, name)(weights=None)
    for m in ann.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # the cumulative average: the pass's statistics
    images = SyntheticImages(32, size, seed=seed + 1)
    with torch.no_grad():  # one pass over 32 images, 8 at a time (a small peak)
        for i in range(0, 32, 8):
            ann.train()(torch.stack([images[j][0] for j in range(i, i + 8)]))
    return ann.eval()


def _rss_mb() -> float:
    """The current resident memory in MB (Linux), or NaN."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def run_case(case: dict) -> dict:
    """Run one case in this process; ``{'seconds': ..., 'rss_before_mb': ...}`` plus
    case-specific numbers (the peak memory is added by :func:`_in_subprocess`)."""
    from spikingjelly.activation_based import ann2snn, functional


    torch.set_num_threads(case.get("threads") or torch.get_num_threads())
    ann = make_ann(case["model"], case["size"])
    T, bs = case["T"], case["batch_size"]
    loader = torch.utils.data.DataLoader(SyntheticImages(case["images"], case["size"]),
                                         batch_size=bs)
    inputs = [x for x, _ in loader] if case["kind"] == "snn" else None
    out = {"rss_before_mb": _rss_mb()}
    kind = case["kind"]
    if kind in ("ltb", "rate", "tpp"):
        recipe = {"ltb": lambda: ann2snn.LocalThresholdBalancingRecipe(loader),
                  "rate": lambda: ann2snn.RateCodingRecipe(loader, mode="99.9%"),
                  "tpp": lambda: ann2snn.TPPCalibrationRecipe(
                      loader, T, neuron="tpp", neuron_kwargs={"count": "exact"})}[kind]
        start = time.perf_counter()
        ann2snn.Converter(recipe()).convert(ann)
        out["seconds"] = time.perf_counter() - start
    elif kind == "snn":
        x = inputs[0]
        recipe = ann2snn.RateCodingRecipe([x], mode="99.9%", neuron="tpp",
                                          neuron_kwargs={"count": "exact"})
        snn = ann2snn.Converter(recipe).convert(ann)
        functional.set_step_mode(snn, "m")
        with torch.no_grad():
            times = {}
            for name, fn in (
                    ("ann", lambda: ann(x)),
                    ("multi_step", lambda: (functional.reset_net(snn),
                                            snn(x.unsqueeze(0).expand(T, *x.shape)))),
                    ("count_mode", lambda: _counted(tpp_plugin, snn, x, T))):
                fn()  # warm-up
                start = time.perf_counter()
                fn()
                times[name] = time.perf_counter() - start
        out.update(times)
        out["seconds"] = times["multi_step"]
    elif kind == "finetune":
        result = calibrate_for_T(ann, loader, T, max_samples=bs)
        out["rss_before_mb"] = _rss_mb()
        start = time.perf_counter()
        finetune(ann, result, loader, 1, holdout=0.0, batch_size=bs)
        out["seconds"] = time.perf_counter() - start
        train = copy.deepcopy(ann).train()
        opt = torch.optim.SGD(train.parameters(), lr=1e-3, momentum=0.9)
        start = time.perf_counter()
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(train(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        out["ann_epoch"] = time.perf_counter() - start
    else:
        raise ValueError(f"unknown case kind {kind!r}")
    return out


def _counted(tpp_plugin, snn, x, T):
    with tpp_plugin.count_mode(snn, T):
        return snn(x)


def _in_subprocess(case: dict, timeout: float) -> dict:
    """:func:`run_case` in a fresh interpreter, with its peak RSS (``VmHWM``)."""
    cmd = [sys.executable, "-m", "tpp_plugin.experiments.scale_bench", "--case", json.dumps(case)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**case, "error": f"over {timeout:.0f} s"}
    if done.returncode != 0:
        return {**case, "error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    return {**case, **json.loads(done.stdout.strip().splitlines()[-1])}


def run_all(models, images, T: int = 4, batch_size: int = 32, size: int = 224,
            finetune_images: int = 256, kinds=("ltb", "rate", "tpp", "snn", "finetune"),
            timeout: float = 1800, threads: int = 0, echo=print) -> list:
    """Every case (see the module docstring), each in its own subprocess; the rows of
    :func:`format_table`."""
    rows = []
    for model in models:
        cases = [dict(kind=k, images=n) for n in images for k in ("ltb", "rate", "tpp")
                 if k in kinds]
        if "snn" in kinds:
            cases.append(dict(kind="snn", images=batch_size))
        if "finetune" in kinds:
            cases.append(dict(kind="finetune", images=finetune_images))
        for case in cases:
            case.update(model=model, T=T, batch_size=batch_size, size=size, threads=threads)
            row = _in_subprocess(case, timeout)
            echo(json.dumps(row))
            rows.append(row)
    return rows


def format_table(rows: list) -> str:
    """The rows as markdown tables: the calibrations (seconds, peak MB, ratios to LTB on the
    same images), the SNN passes and fine-tuning."""
    out = ["| model | images | LTB s | LTB MB | RateCoding s | MB | TPP calibration s | MB | "
           "TPP / LTB time | TPP / LTB memory |", "|---|---|---|---|---|---|---|---|---|---|"]
    calib = {}
    for r in rows:
        if r["kind"] in ("ltb", "rate", "tpp"):
            calib.setdefault((r["model"], r["images"]), {})[r["kind"]] = r

    def cell(r, key):
        return "—" if r is None or "error" in r else f"{r[key]:.0f}" if key == "peak_mb" \
            else f"{r[key]:.1f}"

    for (model, n), c in calib.items():
        ltb, rate, tpp = c.get("ltb"), c.get("rate"), c.get("tpp")
        ok = ltb and tpp and "error" not in ltb and "error" not in tpp
        out.append(f"| {model} | {n} | {cell(ltb, 'seconds')} | {cell(ltb, 'peak_mb')} | "
                   f"{cell(rate, 'seconds')} | {cell(rate, 'peak_mb')} | "
                   f"{cell(tpp, 'seconds')} | {cell(tpp, 'peak_mb')} | "
                   + (f"{tpp['seconds'] / ltb['seconds']:.2f}× | "
                      f"{tpp['peak_mb'] / ltb['peak_mb']:.2f}× |" if ok else "— | — |"))
    for r in rows:
        if r["kind"] == "snn" and "error" not in r:
            out += ["", "| model | batch | ANN pass s | SNN multi-step (T) s | count mode s | "
                    "multi-step / ANN | count / ANN |", "|---|---|---|---|---|---|---|",
                    f"| {r['model']} | {r['images']} | {r['ann']:.2f} | {r['multi_step']:.2f} "
                    f"(T={r['T']}) | {r['count_mode']:.2f} | {r['multi_step'] / r['ann']:.1f}× | "
                    f"{r['count_mode'] / r['ann']:.1f}× |"]
        if r["kind"] == "finetune" and "error" not in r:
            out += ["", "| model | images | fine-tuning epoch s | ANN training epoch s | ratio | "
                    "peak MB | RSS before MB |", "|---|---|---|---|---|---|---|",
                    f"| {r['model']} | {r['images']} | {r['seconds']:.1f} | {r['ann_epoch']:.1f} | "
                    f"{r['seconds'] / r['ann_epoch']:.1f}× | {r['peak_mb']:.0f} | "
                    f"{r['rss_before_mb']:.0f} |"]
    errors = [f"{r['kind']} {r['model']} {r['images']}: {r['error']}" for r in rows
              if "error" in r]
    return "\n".join(out + ([""] + ["failed: " + e for e in errors] if errors else []))


def write_docs(path: str, table: str, header: str) -> None:
    """Put ``table`` (after ``header``) between the markers of ``path`` (appended with them if
    absent)."""
    text = open(path).read() if os.path.exists(path) else ""
    block = f"{DOC_BEGIN}\n{header}\n\n{table}\n{DOC_END}"
    if DOC_BEGIN in text and DOC_END in text:
        head, rest = text.split(DOC_BEGIN, 1)
        text = head + block + rest.split(DOC_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Cost as the work grows\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


def main(args) -> int:
    """``python -m tpp_plugin bench --scale``."""
    rows = run_all(args.models, args.images, args.scale_T, args.batch_size, args.size,
                   args.finetune_images, args.cases, args.timeout, args.threads)
    table = format_table(rows)
    print(table)
    if args.write_docs:
        header = (f"`python -m tpp_plugin bench --scale --models {' '.join(args.models)} "
                  f"--images {' '.join(map(str, args.images))}` (T={args.scale_T}, batches of "
                  f"{args.batch_size}, {args.size} px, torch {torch.__version__}, "
                  f"{os.cpu_count()} CPUs)")
        write_docs(args.write_docs, table, header)
        print(f"wrote {args.write_docs}")
    return 0


def add_arguments(parser) -> None:
    """The ``--scale`` options of ``python -m tpp_plugin bench``."""

    parser.add_argument("--scale", action="store_true",
                        help="instead: cost as the work grows (torchvision ResNets at 224 px)")
    parser.add_argument("--models", nargs="+", default=["resnet18"],
                        choices=["resnet18", "resnet34", "resnet50"])
    parser.add_argument("--images", type=positive_int, nargs="+", default=[128, 512, 1024])
    parser.add_argument("--scale-T", type=positive_int, default=4)
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--size", type=positive_int, default=224)
    parser.add_argument("--finetune-images", type=positive_int, default=256)
    parser.add_argument("--cases", nargs="+", default=["ltb", "rate", "tpp", "snn", "finetune"],
                        choices=["ltb", "rate", "tpp", "snn", "finetune"])
    parser.add_argument("--timeout", type=positive_int, default=1800,
                        help="seconds per case")
    parser.add_argument("--threads", type=nonnegative_int, default=0,
                        help="torch threads per case (0: torch's default)")
    parser.add_argument("--write-docs", metavar="FILE", default=None,
                        help="also put the table into FILE (e.g. docs/performance.md)")


def peak_rss_mb() -> float:
    """This process's peak resident memory, MB: the ``VmHWM`` of its own address space.
    (``getrusage``'s ``ru_maxrss`` is not: Linux keeps the high-water mark of the address space
    an ``exec`` replaced, so a child started from a large parent — a test runner, say — reports
    at least the parent's peak.)"""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--case":
        result = run_case(json.loads(sys.argv[2]))
        result["peak_mb"] = peak_rss_mb()
        print(json.dumps(result))
    else:
        sys.exit("usage: python -m tpp_plugin bench --scale [options]")
