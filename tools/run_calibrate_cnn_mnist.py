"""SpikingJelly 2.x's own ``ann2snn/examples/cnn_mnist.py``, unmodified, under
``python -m tpp_plugin run``: as shipped (IF), with TPP, and with ``--calibrate`` — the numbers in
the README's first screen.

The data are a Fashion-MNIST subset written in torchvision's MNIST layout (the example reads
MNIST; no download), and the checkpoint is the example's CNN trained here (the example would
download its own)::

    python tools/run_calibrate_cnn_mnist.py --T 2 4 8 --train 6000 --test 1000 --dir /tmp/cnn_mnist

Prints per T and variant the example's ANN, RateCoding('99.9%') and LTB accuracies, and the
plugin's stderr lines.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def write_mnist_layout(root: Path, n_train: int, n_test: int) -> None:
    from tpp_plugin.experiments.data import FASHION_MNIST_DIR, read_idx

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        for kind, dims in (("images-idx3-ubyte", 3), ("labels-idx1-ubyte", 1)):
            data = read_idx(os.path.join(FASHION_MNIST_DIR, f"{split}-{kind}.gz"))[:n]
            header = np.array([0x08 << 8 | dims, *data.shape], dtype=">i4").tobytes()
            (raw / f"{split}-{kind}").write_bytes(header + data.astype(np.uint8).tobytes())


def train_checkpoint(root: Path, epochs: int) -> Path:
    import torchvision
    from spikingjelly.activation_based.ann2snn.sample_models import mnist_cnn

    checkpoint = root / "cnn.pth"
    if checkpoint.exists():
        return checkpoint
    torch.manual_seed(0)
    train = torchvision.datasets.MNIST(str(root), train=True,
                                       transform=torchvision.transforms.ToTensor())
    model = mnist_cnn.CNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        for img, label in torch.utils.data.DataLoader(train, batch_size=50, shuffle=True):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(img), label).backward()
            optimizer.step()
    torch.save(model.state_dict(), checkpoint)
    return checkpoint


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--T", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--train", type=int, default=6000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--dir", default="/tmp/tpp_cnn_mnist")
    args = parser.parse_args()
    from spikingjelly.activation_based.ann2snn.examples import cnn_mnist

    root = Path(args.dir)
    if not (root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").exists():
        write_mnist_layout(root, args.train, args.test)
    checkpoint = train_checkpoint(root, args.epochs)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    for T in args.T:
        variants = {
            "IF (as shipped)": ["--neuron", "if"],
            "TPP exact": ["--neuron", "tpp", "--neuron-kwargs", f"T={T}", "count=exact", "--"],
            "TPP exact --calibrate": ["--neuron", "tpp", "--calibrate", "--neuron-kwargs",
                                      f"T={T}", "count=exact", "--"],
        }
        for label, runner in variants.items():
            output = root / "results.json"
            start = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "tpp_plugin", "run", *runner, cnn_mnist.__file__,
                 "--dataset-dir", str(root), "--time-steps", str(T), "--device", "cpu",
                 "--checkpoint-path", str(checkpoint), "--output", str(output)],
                env=env, capture_output=True, text=True, cwd=str(root))
            if done.returncode:
                print(done.stderr[-3000:])
                return done.returncode
            metrics = json.loads(output.read_text())["metrics"]
            print(f"T={T} {label:24s} ANN {metrics['ann']['top1']:.1f}  "
                  f"RateCoding('99.9%') {metrics[f'robust_scalar_t{T}']['top1']:.1f}  "
                  f"LTB {metrics[f'ltb_t{T}']['top1']:.1f}  "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
            for line in done.stderr.splitlines():
                if line.startswith("tpp_plugin:"):
                    print("   ", line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
